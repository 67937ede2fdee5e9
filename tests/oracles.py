"""Independent references for the normalizer tests: fp64 bisection and brute force over supports."""

from __future__ import annotations

import itertools

import torch


def bisection_entmax(x: torch.Tensor, alpha: float, iterations: int = 200) -> torch.Tensor:
    """alpha-entmax of the last dim by plain bisection on tau in fp64 (alpha > 1)."""
    z = x.double() * (alpha - 1)
    m = z.amax(-1, keepdim=True)
    lo, hi = m - 1, m
    for _ in range(iterations):
        mid = (lo + hi) / 2
        total = (z - mid).clamp_min(0).pow(1 / (alpha - 1)).sum(-1, keepdim=True)
        lo = torch.where(total >= 1, mid, lo)
        hi = torch.where(total >= 1, hi, mid)
    p = (z - (lo + hi) / 2).clamp_min(0).pow(1 / (alpha - 1))
    return p / p.sum(-1, keepdim=True)


def brute_force_row(row: list[float], alpha: float) -> list[float]:
    """sparsemax or 1.5-entmax of a short row by trying every support set.

    For a candidate support S the threshold has a closed form; the answer is
    the S whose threshold leaves exactly S above it.
    """
    z = [v * (alpha - 1) for v in row]
    n = len(z)
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            values = [z[i] for i in support]
            if alpha == 2.0:
                tau = (sum(values) - 1) / size
            else:
                mean = sum(values) / size
                spread = sum((v - mean) ** 2 for v in values)
                if spread > 1:
                    continue
                tau = mean - ((1 - spread) / size) ** 0.5
            inside = all(z[i] > tau for i in support)
            outside = all(z[i] <= tau for i in range(n) if i not in support)
            if inside and outside:
                power = 1 / (alpha - 1)
                return [max(v - tau, 0.0) ** power for v in z]
    raise AssertionError("no consistent support")
