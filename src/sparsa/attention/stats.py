"""Per-row diagnostics that attention returns on request."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class AttentionStats:
    """tau (B, H, Nq): the entmax threshold of each query row in units of (alpha-1) * score
    (the log-partition for softmax rows; +inf for rows with no visible key);
    support (B, H, Nq): the number of keys with nonzero weight;
    skipped_fraction: the share of the (Nq, Nk) score entries that the passes after the first
    (weights @ V and the whole backward) skip, being masked by causality or proven zero;
    threshold_passes (B, H, query tiles): for the Triton backend, the passes over the keys that
    each tile of queries made to find tau (None for the other backends);
    unscored_key_blocks (H,): the share of each head's (query block, key block) pairs (Triton: query
    and key tiles) whose scores were never computed, the bounds having proven every weight in them
    zero (zeros for the reference backend; the Triton kernels bound tiles only under a causal mask
    with ALiBi slopes)."""

    tau: Tensor
    support: Tensor
    skipped_fraction: float
    threshold_passes: Tensor | None = None
    unscored_key_blocks: Tensor | None = None


def thresholds_of(scores: Tensor, weights: Tensor, alpha: float | Tensor) -> Tensor:
    """Thresholds read back from dense scores and weights (for the reference backend).

    On the support, (alpha-1) s - tau = p^(alpha-1); for softmax, s - log Z = log p.
    Evaluated at each row's largest weight, where it is best conditioned.
    """
    top, index = weights.max(-1, keepdim=True)
    score = scores.gather(-1, index)
    alpha = torch.as_tensor(alpha, dtype=scores.dtype, device=scores.device)
    entmax_tau = (alpha - 1) * score - top.pow(alpha - 1)
    softmax_tau = score - top.log()
    tau = torch.where(alpha == 1, softmax_tau, entmax_tau)
    return tau.masked_fill(top == 0, float("inf")).squeeze(-1)
