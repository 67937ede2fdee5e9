"""The dense reference backend: the whole (Nq, Nk) score matrix, autograd for the backward.

Straightforward on purpose: it is the ground truth every other backend is
tested against, on any device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..normalize import entmax
from ..normalize._validate import compute_dtype
from .masks import ScoreBias
from .stats import AttentionStats, thresholds_of


def reference_row_map_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    weigh: Callable[[Tensor], Tensor],
    bias: ScoreBias,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """Attention whose weights are ``weigh(scores)`` (a bound row map of normalize.rowmaps), densely."""
    weights = weigh(_biased_scores(q, k, bias, scale))
    return _weighted_values(weights, v, dropout_p, q.dtype)


def _biased_scores(q: Tensor, k: Tensor, bias: ScoreBias, scale: float) -> Tensor:
    """scale q k^T + bias, (B, H, Nq, Nk) in the compute dtype."""
    batch, heads, n_q, _ = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    work = compute_dtype(q.dtype)
    # Heads h = g_kv * group + j share key/value head g_kv: group the queries instead of repeating K and V.
    grouped_q = q.to(work).reshape(batch, kv_heads, heads // kv_heads * n_q, -1)
    scores = bias.capped(scale * grouped_q @ k.to(work).transpose(-1, -2)).view(batch, heads, n_q, n_k)
    return bias.apply_(scores, 0, n_q)


def _weighted_values(weights: Tensor, v: Tensor, dropout_p: float, dtype: torch.dtype) -> Tensor:
    """weights (B, H, Nq, Nk) times v (B, Hkv, Nk, Dv), after attention dropout, in ``dtype``."""
    batch, heads, n_q, n_k = weights.shape
    kv_heads = v.shape[1]
    kept = torch.nn.functional.dropout(weights, dropout_p) if dropout_p > 0 else weights
    out = kept.reshape(batch, kv_heads, heads // kv_heads * n_q, n_k) @ v.to(weights.dtype)
    return out.view(batch, heads, n_q, -1).to(dtype)


def reference_weights(
    q: Tensor, k: Tensor, alpha: float | Tensor, bias: ScoreBias, scale: float, sinks: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The rows' scores (B, H, Nq, Nk, plus one last column per row with sinks) and their entmax weights."""
    scores = _biased_scores(q, k, bias, scale)
    if sinks is not None:
        sink_column = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink_column], -1)
    return scores, entmax(scores, _head_alpha(alpha, scores), dim=-1)


def _head_alpha(alpha: float | Tensor, scores: Tensor) -> float | Tensor:
    return alpha if isinstance(alpha, float) else alpha.to(scores.dtype).view(1, -1, 1, 1)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float | Tensor,
    bias: ScoreBias,
    scale: float,
    stats: bool,
    dropout_p: float = 0.0,
    sinks: Tensor | None = None,
) -> tuple[Tensor, AttentionStats | None]:
    """alpha-entmax attention of (B, H, Nq, D) queries over (B, Hkv, Nk, D) keys; alpha float or (H,).

    ``dropout_p`` > 0 zeroes weights at random and rescales the rest, as
    torch's attention dropout does; stats describe the weights before it.
    ``sinks`` (H,): one more score per row that carries no value.
    """
    scores, row_weights = reference_weights(q, k, alpha, bias, scale, sinks)
    weights = row_weights if sinks is None else row_weights[..., :-1]
    out = _weighted_values(weights, v, dropout_p, q.dtype)
    if not stats:
        return out, None
    head_alpha = _head_alpha(alpha, scores)
    with torch.no_grad():
        return out, AttentionStats(
            tau=thresholds_of(scores, row_weights, head_alpha),
            support=(weights > 0).sum(-1),
            skipped_fraction=0.0,
            unscored_key_blocks=torch.zeros(q.shape[1]),
        )
