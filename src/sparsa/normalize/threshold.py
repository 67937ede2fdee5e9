"""The threshold tau of alpha-entmax and the algorithms that find it.

For a row x and alpha > 1, entmax_alpha(x)_i = [(alpha-1) x_i - tau]_+^(1/(alpha-1))
with tau chosen so that the weights sum to one (docs/mathematics.md, section 1).

The solvers work on one block of rows in shifted units y = (alpha-1)(x - m),
m the row maximum, so the largest y is 0 and the shifted threshold
s = tau - (alpha-1) m lies in [-1, -n^(1-alpha)]. Entries with y <= -1 are
zero whatever the rest of the row is (the sparsity certificate).

- sparsemax (alpha = 2) and 1.5-entmax: Newton from the lower bracket end
  with an exact finish. At each step the closed-form threshold of the current
  support is computed; when every entry of that support stays above it, it is
  the exact answer (the support equations hold), so the row is done. Newton
  from the left never overshoots (f is convex and decreasing), so the support
  shrinks to the true one within a few steps. Rows that do not certify (ties
  at the threshold, rounding) fall back to the sort-based algorithm.
- Sort-based exact algorithm for the same two maps, on the k largest entries
  of each row (a partial sort), doubling k for rows whose support reaches k.
- Any other alpha: Halley's method on f(s) = sum u^k - 1, u = [y - s]_+,
  k = 1/(alpha-1), kept inside a bracket that shrinks with the sign of f at
  every step and replaced by bisection when it leaves the bracket or fails to
  halve |f|; it stops on a tolerance on f or on the bracket width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._candidates import BOUND_MARGIN, Entries
from ._compile import positive_pow, row_blocks, row_kernel, wants_compiled
from ._validate import (
    alpha_rows,
    check_alpha,
    check_dim,
    check_k,
    check_scores,
    check_tol,
    compute_dtype,
    is_exact_alpha,
    to_rows,
)

INF = float("inf")
MAX_EXACT_STEPS = 24
MAX_HALLEY_STEPS = 200
DEFAULT_TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}

# Shifted rows: x is a block (rows, n), m its row maxima (rows, 1), s the current
# shifted thresholds (rows, 1).


@row_kernel
def _sparsemax_support_stats(x: Tensor, m: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    u = (x - m - s).clamp_min(0)
    support = u > 0
    count = support.sum(-1, keepdim=True).to(x.dtype)
    smallest = torch.where(support, u, INF).amin(-1, keepdim=True)
    return count, u.sum(-1, keepdim=True), smallest


@row_kernel
def _entmax15_support_stats(x: Tensor, m: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    u = ((x - m) * 0.5 - s).clamp_min(0)
    support = u > 0
    count = support.sum(-1, keepdim=True).to(x.dtype)
    smallest = torch.where(support, u, INF).amin(-1, keepdim=True)
    return count, u.sum(-1, keepdim=True), (u * u).sum(-1, keepdim=True), smallest


@row_kernel
def _tsallis_derivatives(
    x: Tensor, m: Tensor, scale: Tensor, power: Tensor, s: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    u = (scale * (x - m) - s).clamp_min(0)
    support = u > 0
    u_pow = torch.where(support, positive_pow(u, power - 1), 0)
    f = (u_pow * u).sum(-1, keepdim=True) - 1
    f1 = -power * u_pow.sum(-1, keepdim=True)
    f2 = power * (power - 1) * torch.where(support, u_pow / u, 0).sum(-1, keepdim=True)
    return f, f1, f2


def _exact_newton(
    entries: Entries, m: Tensor, power: int, skip: Tensor, start: Tensor, compiled: bool
) -> tuple[Tensor, Tensor]:
    """Shifted thresholds for sparsemax (power 1) or 1.5-entmax (power 2), and which rows certified.

    ``start`` must be a lower bound of the thresholds (-1 always is).
    """
    s = start
    done = skip
    # The closed form on the support at s is the answer when it lies at or above s (nothing left
    # out lies above it) and below every entry of the support. Rounding can put it a few ulps below s.
    slack = -4 * torch.finfo(m.dtype).eps
    for _ in range(MAX_EXACT_STEPS):
        # Newton steps from the left stay below the root: s is a lower bound.
        entries.narrow(s)
        x = entries.values
        if power == 1:
            count, total, smallest = _sparsemax_support_stats(x, m, s, compiled=compiled)
            step = (total - 1) / count
            exact = (step >= slack) & (smallest > step)
        else:
            count, total, total_sq, smallest = _entmax15_support_stats(x, m, s, compiled=compiled)
            excess = total_sq - 1
            discriminant = total * total - count * excess
            # Smaller root of sum (u - d)^2 = 1 over the support, in the cancellation-free form.
            root = excess / (total + discriminant.clamp_min(0).sqrt())
            exact = (discriminant >= 0) & (root >= slack) & (smallest > root)
            step = torch.where(exact, root, excess / (2 * total))
        s = torch.where(done, s, s + step)
        done = done | exact
        if bool(done.all()):
            break
    return s, done


def _sorted_prefix_threshold(top: Tensor, power: int) -> tuple[Tensor, Tensor]:
    """Threshold and support size from entries sorted in decreasing order."""
    sizes = torch.arange(1, top.shape[-1] + 1, device=top.device, dtype=top.dtype)
    if power == 1:
        candidates = (top.cumsum(-1) - 1) / sizes
        support = (candidates < top).sum(-1, keepdim=True)
    else:
        mean = top.cumsum(-1) / sizes
        mean_sq = (top * top).cumsum(-1) / sizes
        spread = ((1 - sizes * (mean_sq - mean * mean)) / sizes).clamp_min(0)
        candidates = mean - spread.sqrt()
        support = (candidates <= top).sum(-1, keepdim=True)
    return candidates.gather(-1, support - 1), support


def sorted_threshold(y: Tensor, power: int, k: int | None) -> Tensor:
    """Exact shifted threshold from a (partial) sort of shifted rows y.

    Uses the k largest entries of each row and doubles k for the rows whose
    support reaches k, so the answer is exact for every k.
    """
    # Entries at or below -1 are never in the support; clamping keeps -inf out of the sums.
    y = y.clamp_min(-1)
    n = y.shape[-1]
    k = n if k is None else min(k, n)
    s = torch.empty(y.shape[0], 1, dtype=y.dtype, device=y.device)
    pending = torch.arange(y.shape[0], device=y.device)
    while pending.numel() > 0:
        rows = y[pending]
        top = rows.sort(-1, descending=True).values if k >= n else rows.topk(k, -1).values
        threshold, support = _sorted_prefix_threshold(top, power)
        complete = ((support < k) | (k >= n)).squeeze(-1)
        s[pending[complete]] = threshold[complete]
        pending = pending[~complete]
        k = min(2 * k, n)
    return s


def _halley(
    entries: Entries, m: Tensor, alpha: Tensor, tol: float, skip: Tensor, start: Tensor, compiled: bool
) -> tuple[Tensor, Tensor]:
    """Shifted thresholds for per-row alpha (rows, 1) by safeguarded Halley steps, and lower bounds.

    ``start`` must be a lower bound of the thresholds (-1 always is).
    """
    scale = alpha - 1
    power = 1 / scale
    lo = start
    hi = -torch.pow(float(entries.length), -scale)
    s = lo.clone()
    resolution = 4 * torch.finfo(m.dtype).eps
    done = skip
    previous_residual = torch.full_like(m, INF)
    for _ in range(MAX_HALLEY_STEPS):
        entries.narrow(lo)
        f, f1, f2 = _tsallis_derivatives(entries.values, m, scale, power, s, compiled=compiled)
        lo = torch.where(f > 0, s, lo)
        hi = torch.where(f < 0, s, hi)
        residual = f.abs()
        done = done | (residual <= tol) | (hi - lo <= resolution)
        if bool(done.all()):
            break
        halley = s - 2 * f * f1 / (2 * f1 * f1 - f * f2)
        newton = s - f / f1
        # For 1.5 < alpha <= 2 the curvature sum u^(k-2) is dominated by entries at the edge of
        # the support and makes Halley steps timid; Newton is the better step there.
        use_halley = ((power >= 2) | (power < 1)) & torch.isfinite(halley)
        proposal = torch.where(use_halley, halley, newton)
        inside = (proposal > lo) & (proposal < hi)
        # A step that did not halve the residual is making too little progress: bisect instead.
        progressing = residual <= 0.5 * previous_residual
        s_next = torch.where(inside & progressing, proposal, 0.5 * (lo + hi))
        s = torch.where(done, s, s_next)
        previous_residual = residual
    return s, lo


@dataclass
class Threshold:
    """Thresholds of one block of rows (rows, n), in shifted units."""

    m: Tensor  # row maxima (rows, 1); 0 for rows with no finite maximum
    s: Tensor  # shifted thresholds: +inf for all -inf rows, NaN for rows holding NaN or +inf
    invalid: Tensor  # (rows, 1): rows holding NaN or +inf
    entries: Entries  # what the thresholds were solved on; entries.expand maps weights back


def _solve(
    entries: Entries,
    m: Tensor,
    alpha: float | Tensor,
    k: int | None,
    tol: float | None,
    skip: Tensor,
    start: Tensor,
    compiled: bool,
) -> tuple[Tensor, Tensor]:
    """Shifted thresholds (rows, 1) and lower bounds of them, from lower bounds ``start``."""
    if is_exact_alpha(alpha):
        power = 2 if alpha == 1.5 else 1
        if k is not None:
            entries.narrow(start)
            s = sorted_threshold((entries.values - m) * (alpha - 1), power, k)
            return s, s
        s, exact = _exact_newton(entries, m, power, skip, start, compiled)
        fallback = ~exact.squeeze(-1)
        if bool(fallback.any()):
            y = (entries.values[fallback] - m[fallback]) * (alpha - 1)
            s[fallback] = sorted_threshold(y, power, None)
        return s, s
    alpha_rows = torch.as_tensor(alpha, dtype=m.dtype, device=m.device).expand_as(m)
    tolerance = DEFAULT_TOLERANCE.get(m.dtype, 1e-6) if tol is None else tol
    return _halley(entries, m, alpha_rows, tolerance, skip, start, compiled)


def _lower_bound(
    entries: Entries, m: Tensor, alpha: float | Tensor, tol: float | None, skip: Tensor, compiled: bool
) -> Tensor:
    """A lower bound of the shifted thresholds: -1, or the threshold of the rows' summaries."""
    bound = torch.full_like(m, -1.0)
    summary = entries.summary()
    if summary is None:
        return bound
    coarse = Entries(summary, narrowing=False)
    _, lower = _solve(coarse, m, alpha, None, tol, skip, bound, compiled)
    return torch.where(skip, bound, (lower - BOUND_MARGIN).clamp_min(-1))


def shifted_threshold(
    x: Tensor, alpha: float | Tensor, k: int | None, tol: float | None, compiled: bool
) -> Threshold:
    """Thresholds of a block of rows x (rows, n) for alpha a float or a (rows, 1) tensor > 1."""
    entries = Entries(x)
    m = entries.row_maxima()
    masked = m == -INF
    invalid = torch.isnan(m) | (m == INF)
    skip = masked | invalid
    m = m.masked_fill(skip, 0)
    entries.set_shift(m, alpha - 1)
    start = _lower_bound(entries, m, alpha, tol, skip, compiled)
    s, _ = _solve(entries, m, alpha, k, tol, skip, start, compiled)
    s = s.masked_fill(masked, INF).masked_fill(invalid, float("nan"))
    return Threshold(m, s, invalid, entries)


def entmax_threshold(
    x: Tensor, alpha: float | Tensor = 1.5, dim: int = -1, *, k: int | None = None, tol: float | None = None
) -> Tensor:
    """The threshold tau of alpha-entmax along ``dim``, with size 1 along ``dim``.

    entmax_alpha(x) = [(alpha-1) x - tau]_+^(1/(alpha-1)). Rows of only -inf
    give +inf, rows holding NaN or +inf give NaN. alpha must be > 1 (softmax
    has no threshold); arguments as in :func:`sparsa.entmax`. Not differentiable.
    """
    x = check_scores(x)
    dim = check_dim(x, dim)
    alpha = check_alpha(alpha, x, dim)
    k = check_k(k, alpha)
    tol = check_tol(tol)
    one = alpha == 1 if isinstance(alpha, float) else bool((alpha == 1).any())
    if one:
        raise ValueError("alpha must be > 1 for a threshold (alpha = 1 is softmax, which has none)")
    rows, restore = to_rows(x.detach(), dim)
    work = compute_dtype(x.dtype)
    per_row = alpha_rows(alpha.detach(), x, dim).to(work) if isinstance(alpha, Tensor) else None
    tau = torch.full((rows.shape[0], 1), float("nan"), dtype=work, device=x.device)
    compiled = wants_compiled(x.numel(), x.device)
    for block in row_blocks(rows.shape[0], rows.shape[1], compiled):
        block_alpha = alpha if per_row is None else per_row[block]
        found = shifted_threshold(rows[block].to(work), block_alpha, k, tol, compiled)
        tau[block] = (torch.as_tensor(block_alpha, dtype=work) - 1) * found.m + found.s
    return restore(tau)
