"""Normalizers: one row of scores -> a probability distribution.

softmax (alpha = 1), 1.5-entmax, sparsemax (alpha = 2) and alpha-entmax for any
alpha >= 1, with alpha a float or a tensor (one alpha per row, learnable).
Each map is an autograd.Function that saves only its output and uses the
closed-form gradient (docs/mathematics.md, section 2): with g = p^(2-alpha) on the
support, dx = g * dp - g * sum(g * dp) / sum(g).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._compile import map_row_blocks, positive_pow, row_kernel, wants_compiled
from ._native import native_entmax_rows
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
from .threshold import shifted_threshold


@row_kernel
def _sparsemax_weights(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    return (x - m - s).clamp_min(0)


@row_kernel
def _entmax15_weights(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    return ((x - m) * 0.5 - s).clamp_min(0).square()


@row_kernel
def _tsallis_weights(x: Tensor, m: Tensor, scale: Tensor, power: Tensor, s: Tensor) -> Tensor:
    u = (scale * (x - m) - s).clamp_min(0)
    p = torch.where(u > 0, positive_pow(u, power), 0)
    total = p.sum(-1, keepdim=True)
    # Dividing by the sum makes the weights sum to one to rounding, whatever the solver's tolerance.
    return p / torch.where(total > 0, total, 1)


def _tangent(g: Tensor, dp: Tensor) -> Tensor:
    gdp = g * dp
    total = g.sum(-1, keepdim=True)
    mean = gdp.sum(-1, keepdim=True) / torch.where(total > 0, total, 1)
    return gdp - mean * g


@row_kernel
def _softmax_grad(p: Tensor, dp: Tensor) -> Tensor:
    return _tangent(p, dp)


@row_kernel
def _sparsemax_grad(p: Tensor, dp: Tensor) -> Tensor:
    return _tangent((p > 0).to(p.dtype), dp)


@row_kernel
def _entmax15_grad(p: Tensor, dp: Tensor) -> Tensor:
    return _tangent(p.sqrt(), dp)


@row_kernel
def _entmax_grad(p: Tensor, dp: Tensor, alpha: Tensor) -> Tensor:
    return _tangent(torch.where(p > 0, positive_pow(p, 2 - alpha), 0), dp)


@row_kernel
def _entmax_alpha_grad(p: Tensor, dp: Tensor, alpha: Tensor) -> Tensor:
    support = p > 0
    log_p = torch.where(support, p.log(), 0)
    g = torch.where(support, positive_pow(p, 2 - alpha), 0)
    g_total = g.sum(-1, keepdim=True)
    skewed = g / torch.where(g_total > 0, g_total, 1)
    p_log_p = p * log_p
    entropy_term = p_log_p.sum(-1, keepdim=True)
    scale = alpha - 1
    general = (dp * ((p - skewed) / scale**2 - (p_log_p - skewed * entropy_term) / scale)).sum(
        -1, keepdim=True
    )
    # At alpha = 1 the formula is 0/0; its limit is -p/2 * ((log p)^2 - E_p[(log p)^2]).
    log_sq = log_p * log_p
    at_one = (-0.5 * dp * p * (log_sq - (p * log_sq).sum(-1, keepdim=True))).sum(-1, keepdim=True)
    return torch.where(alpha == 1, at_one, general)


def _softmax_rows(x: Tensor) -> Tensor:
    """Softmax over the last dim in the compute dtype, zeros for rows that are all -inf."""
    p = torch.softmax(x, -1, dtype=compute_dtype(x.dtype))
    if x.shape[-1] == 0:
        return p
    masked = x.amax(-1, keepdim=True) == -float("inf")
    if bool(masked.any()):
        p = p.masked_fill(masked, 0)
    return p


@row_kernel
def _softmax_log_partition(x: Tensor, m: Tensor) -> Tensor:
    return torch.exp(x - m).sum(-1, keepdim=True).log()


@row_kernel
def _softmax_weights(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    return torch.exp(x - m - s)


def _softmax_with_threshold(x: Tensor, compiled: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax weights, row maxima m and log-partition s (p = exp(x - m - s)); s = +inf for -inf rows."""
    m = x.amax(-1, keepdim=True)
    masked = m == -float("inf")
    m = m.masked_fill(masked, 0)
    s = _softmax_log_partition(x, m, compiled=compiled).masked_fill(masked, float("inf"))
    return _softmax_weights(x, m, s, compiled=compiled), m, s


def _weights(x: Tensor, m: Tensor, s: Tensor, alpha: float | Tensor, compiled: bool) -> Tensor:
    """Weights from row maxima and shifted thresholds, for alpha > 1 (a float, or (rows, 1))."""
    if is_exact_alpha(alpha):
        kernel = _sparsemax_weights if alpha == 2.0 else _entmax15_weights
        return kernel(x, m, s, compiled=compiled)
    scale = torch.as_tensor(alpha, dtype=x.dtype, device=x.device) - 1
    return _tsallis_weights(x, m, scale, 1 / scale, s, compiled=compiled)


def _split_softmax_rows(x: Tensor, alpha: float | Tensor) -> tuple[float | Tensor, Tensor | None]:
    """alpha with softmax rows replaced by 2 (so solvers apply), and the mask of those rows."""
    if isinstance(alpha, float):
        if is_exact_alpha(alpha):
            return alpha, None
        alpha = x.new_full((x.shape[0], 1), alpha)
    softmax_rows = alpha == 1
    if not bool(softmax_rows.any()):
        return alpha, None
    return torch.where(softmax_rows, 2.0, alpha), softmax_rows


def entmax_rows(
    x: Tensor, alpha: float | Tensor, compiled: bool, k: int | None = None, tol: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """alpha-entmax of a block of rows x (rows, n): weights, row maxima m and thresholds s (rows, 1).

    alpha is a float >= 1 or a (rows, 1) tensor >= 1. With (m, s),
    :func:`entmax_rows_from_threshold` recomputes the weights from the scores
    alone (what a memory-efficient backward needs): for alpha > 1, s is the
    shifted threshold; for softmax rows it is the log-partition.
    """
    if isinstance(alpha, float) and alpha == 1.0:
        return _softmax_with_threshold(x, compiled)
    if compiled and k is None and is_exact_alpha(alpha):
        solved = native_entmax_rows(x, alpha)
        if solved is not None:
            return solved
    alpha, softmax_rows = _split_softmax_rows(x, alpha)
    found = shifted_threshold(x, alpha, k, tol, compiled)
    weights = found.entries.expand(_weights(found.entries.values, found.m, found.s, alpha, compiled))
    m, s = found.m, found.s
    if bool(found.invalid.any()):
        weights = weights.masked_fill(found.invalid, float("nan"))
    if softmax_rows is not None:
        soft_weights, soft_m, soft_s = _softmax_with_threshold(x, compiled)
        weights = torch.where(softmax_rows, soft_weights, weights)
        m = torch.where(softmax_rows, soft_m, m)
        s = torch.where(softmax_rows, soft_s, s)
    return weights, m, s


def entmax_rows_from_threshold(
    x: Tensor, m: Tensor, s: Tensor, alpha: float | Tensor, compiled: bool
) -> Tensor:
    """The weights of :func:`entmax_rows` again, from the scores and the (m, s) it returned."""
    if isinstance(alpha, float) and alpha == 1.0:
        return _softmax_weights(x, m, s, compiled=compiled)
    solvable, softmax_rows = _split_softmax_rows(x, alpha)
    weights = _weights(x, m, s, solvable, compiled)
    if softmax_rows is not None:
        weights = torch.where(softmax_rows, _softmax_weights(x, m, s, compiled=compiled), weights)
    return weights


def entmax_rows_backward(
    p: Tensor, dp: Tensor, alpha: float | Tensor, alpha_grad: bool, compiled: bool
) -> tuple[Tensor, Tensor | None]:
    """Gradients of a block of rows: d scores (rows, n) and, if asked, d alpha (rows, 1)."""
    if isinstance(alpha, Tensor):
        grad_x = _entmax_grad(p, dp, alpha, compiled=compiled)
        return grad_x, _entmax_alpha_grad(p, dp, alpha, compiled=compiled) if alpha_grad else None
    if alpha == 1.0:
        return _softmax_grad(p, dp, compiled=compiled), None
    if alpha == 1.5:
        return _entmax15_grad(p, dp, compiled=compiled), None
    if alpha == 2.0:
        return _sparsemax_grad(p, dp, compiled=compiled), None
    return _entmax_grad(p, dp, torch.tensor(alpha, dtype=p.dtype), compiled=compiled), None


class _EntmaxFunction(torch.autograd.Function):
    """alpha-entmax over the last dim of a (rows, n) tensor; alpha float or (rows, 1)."""

    @staticmethod
    def forward(ctx, x, alpha, k, tol):
        work = compute_dtype(x.dtype)
        compiled = wants_compiled(x.numel(), x.device)

        def block(rows: slice) -> Tensor:
            block_alpha = alpha if isinstance(alpha, float) else alpha[rows].to(work)
            return entmax_rows(x[rows].to(work), block_alpha, compiled, k, tol)[0]

        out = map_row_blocks(block, x, compiled)
        if isinstance(alpha, Tensor):
            ctx.save_for_backward(out, alpha)
        else:
            ctx.save_for_backward(out)
        ctx.alpha = alpha if isinstance(alpha, float) else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out = ctx.saved_tensors[0]
        alpha = ctx.alpha if ctx.alpha is not None else ctx.saved_tensors[1]
        work = compute_dtype(out.dtype)
        compiled = wants_compiled(out.numel(), out.device)

        def block_grads(rows: slice, alpha_grad: bool) -> tuple[Tensor, Tensor | None]:
            block_alpha = alpha[rows].to(work) if isinstance(alpha, Tensor) else alpha
            p, dp = out[rows].to(work), grad_out[rows].to(work)
            return entmax_rows_backward(p, dp, block_alpha, alpha_grad, compiled)

        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = map_row_blocks(lambda rows: block_grads(rows, False)[0], out, compiled)
        grad_alpha = None
        if isinstance(alpha, Tensor) and ctx.needs_input_grad[1]:
            grad_alpha = map_row_blocks(
                lambda rows: block_grads(rows, True)[1], alpha, compiled, length=out.shape[1]
            )
        return grad_x, grad_alpha, None, None


class _SoftmaxFunction(torch.autograd.Function):
    """Softmax over the last dim of a (rows, n) tensor; zeros for fully masked rows."""

    @staticmethod
    def forward(ctx, x):
        out = _softmax_rows(x).to(x.dtype)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        work = compute_dtype(out.dtype)
        compiled = wants_compiled(out.numel(), out.device)
        return map_row_blocks(
            lambda rows: _softmax_grad(out[rows].to(work), grad_out[rows].to(work), compiled=compiled),
            out,
            compiled,
        )


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """Softmax along ``dim`` (alpha-entmax with alpha = 1).

    Unlike ``torch.softmax``, a row whose entries are all -inf (fully masked)
    gives zeros with a zero gradient instead of NaN. fp16/bf16 input is
    computed in fp32 and returned in the input dtype.
    """
    x = check_scores(x)
    rows, restore = to_rows(x, check_dim(x, dim))
    return restore(_SoftmaxFunction.apply(rows))


def entmax(
    x: Tensor,
    alpha: float | Tensor = 1.5,
    dim: int = -1,
    *,
    k: int | None = None,
    tol: float | None = None,
) -> Tensor:
    """alpha-entmax along ``dim``: [(alpha-1) x - tau]_+^(1/(alpha-1)), summing to one.

    Args:
        x: scores of any shape; entries equal to -inf get weight zero, a row of
            only -inf gives zeros, a row holding NaN or +inf gives NaN.
        alpha: >= 1. A float, or a tensor broadcastable to ``x`` with size 1
            along ``dim`` (one alpha per row or per head); gradients flow to a
            tensor alpha. 1 is softmax, 1.5 and 2 use the exact algorithms of
            :func:`entmax15` and :func:`sparsemax`, any other value a
            safeguarded Halley solver.
        dim: the dimension that sums to one.
        k: for alpha 1.5 and 2 only: use an exact partial sort of the k
            largest scores, doubling k for rows whose support reaches it.
        tol: Halley solver tolerance on the weights' sum before the final
            normalization (default 1e-6 in fp32, 1e-12 in fp64).

    Returns:
        weights with the shape and dtype of ``x`` (fp16/bf16 computed in fp32).

    Example:
        >>> import torch, sparsa
        >>> sparsa.entmax(torch.tensor([2.0, 1.0, -1.0]), alpha=1.5)  # the last score gets exactly 0
        tensor([0.8307, 0.1693, 0.0000])
    """
    x = check_scores(x)
    dim = check_dim(x, dim)
    alpha = check_alpha(alpha, x, dim)
    k = check_k(k, alpha)
    tol = check_tol(tol)
    if isinstance(alpha, float) and alpha == 1.0:
        return softmax(x, dim)
    rows, restore = to_rows(x, dim)
    if isinstance(alpha, Tensor):
        alpha = alpha_rows(alpha, x, dim)
    return restore(_EntmaxFunction.apply(rows, alpha, k, tol))


def entmax15(x: Tensor, dim: int = -1, k: int | None = None) -> Tensor:
    """1.5-entmax along ``dim``: [x/2 - tau]_+^2, exact.

    The threshold is found by Newton steps that end with the closed-form
    threshold of the certified support (no tolerance involved); with ``k``
    it is found by an exact partial sort of the k largest scores instead.
    See :func:`entmax` for masking and dtypes.
    """
    return entmax(x, 1.5, dim, k=k)


def sparsemax(x: Tensor, dim: int = -1, k: int | None = None) -> Tensor:
    """sparsemax along ``dim``: the Euclidean projection onto the simplex, exact.

    Same algorithms and conventions as :func:`entmax15`.
    """
    return entmax(x, 2.0, dim, k=k)


def support_size(x: Tensor, alpha: float | Tensor = 1.5, dim: int = -1, *, k: int | None = None) -> Tensor:
    """Number of nonzero weights of ``entmax(x, alpha, dim)`` (int64, ``dim`` removed)."""
    with torch.no_grad():
        return (entmax(x, alpha, dim, k=k) > 0).sum(dim)
