"""How attention weights look: largest weight, normalised entropy and support size per head.

These are the quantities behind "attention dispersion": as the number of keys
grows, softmax's largest weight falls towards 0 and its normalised entropy
rises towards 1, while entmax keeps a small support. Computed from dense
score blocks of a few queries at a time, so long sequences fit in memory.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..normalize import entmax
from ..normalize._validate import compute_dtype
from ..normalize.rowmaps import get_row_map
from .masks import KeyPadding, ScoreBias

SUMMARY_BLOCK_BUDGET = 1 << 22


@dataclass
class WeightSummary:
    """Per head (H,), averaged over batch and the summarised query rows that see a key."""

    max_weight: Tensor
    entropy: Tensor
    support: Tensor
    rows: int


@torch.no_grad()
def weight_summary(
    q: Tensor,
    k: Tensor,
    *,
    alpha: float | Tensor = 1.5,
    is_causal: bool = False,
    attn_mask: Tensor | KeyPadding | None = None,
    scale: float | None = None,
    alibi_slopes: Tensor | None = None,
    window: int | None = None,
    first_query: int = 0,
    row_map: str | None = None,
    row_parameters: dict[str, Tensor] | None = None,
    row_options: dict[str, float] | None = None,
) -> WeightSummary:
    """Summarise the weights of queries ``first_query``.. of q (B, H, Nq, D) over k (B, Hkv, Nk, D).

    Arguments mean what they mean for :func:`sparsa.attention`. The entropy
    of a row is divided by the log of its number of visible keys (1 = uniform);
    rows with a single visible key count as entropy 0. Under a row map whose
    rows are not distributions, the largest weight is the largest magnitude
    and the entropy that of the magnitudes normalised to sum 1; the support
    counts the nonzero weights.
    """
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    if not 0 <= first_query < n_q:
        raise ValueError(f"first_query must lie in [0, {n_q}), got {first_query}")
    bias = ScoreBias(
        batch,
        heads,
        n_q,
        n_k,
        is_causal=is_causal,
        attn_mask=attn_mask,
        alibi_slopes=alibi_slopes,
        device=q.device,
        window=window,
    )
    work = compute_dtype(q.dtype)
    scale = 1 / math.sqrt(dim) if scale is None else scale
    head_alpha = alpha if not isinstance(alpha, Tensor) else alpha.to(work).view(1, heads, 1, 1)
    weigh = None
    if row_map is not None:
        chosen = get_row_map(row_map)
        arguments = chosen.arguments(heads, row_parameters, row_options or {}, q.new_empty(0, dtype=work))
        weigh = functools.partial(chosen.weigh, **arguments)
    keys = k.to(work).repeat_interleave(heads // kv_heads, dim=1)
    step = max(1, SUMMARY_BLOCK_BUDGET // max(1, batch * heads * n_k))
    totals = torch.zeros(3, heads, dtype=torch.float64, device=q.device)
    counted = torch.zeros(heads, dtype=torch.float64, device=q.device)
    for start in range(first_query, n_q, step):
        end = min(n_q, start + step)
        scores = bias.apply_(scale * q[:, :, start:end].to(work) @ keys.transpose(-1, -2), start, end)
        p = entmax(scores, head_alpha, dim=-1) if weigh is None else weigh(scores).abs()
        if weigh is not None:
            total = p.sum(-1, keepdim=True)
            largest, p = p.amax(-1), p / torch.where(total > 0, total, torch.ones_like(total))
        else:
            largest = p.amax(-1)
        visible = torch.isfinite(scores).sum(-1)
        seen = visible > 0
        plogp = torch.where(p > 0, p * p.clamp_min(1e-38).log(), torch.zeros_like(p))
        entropy = -plogp.sum(-1) / visible.clamp_min(2).log()
        entropy = torch.where(visible > 1, entropy, torch.zeros_like(entropy))
        for i, value in enumerate((largest, entropy, (p > 0).sum(-1).to(work))):
            totals[i] += torch.where(seen, value, torch.zeros_like(value)).sum((0, 2)).double()
        counted += seen.sum((0, 2)).double()
    means = totals / counted.clamp_min(1)
    return WeightSummary(*(m.float() for m in means), rows=int(counted.max()))
