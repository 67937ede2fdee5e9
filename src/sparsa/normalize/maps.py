"""Normalizers: one row of scores -> a probability distribution.

softmax (alpha = 1), 1.5-entmax, sparsemax (alpha = 2) and alpha-entmax for any
alpha >= 1, with alpha a float or a tensor (one alpha per row, learnable).
Each map is an autograd.Function that saves only its output and uses the
closed-form gradient (REFERENCE.md section 1): with g = p^(2-alpha) on the
support, dx = g * dp - g * sum(g * dp) / sum(g).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._compile import row_blocks, row_kernel, wants_compiled
from ._validate import (
    alpha_rows,
    check_alpha,
    check_dim,
    check_k,
    check_scores,
    check_tol,
    is_exact_alpha,
    compute_dtype,
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
    p = (scale * (x - m) - s).clamp_min(0).pow(power)
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
    return _tangent(torch.where(p > 0, p.pow(2 - alpha), 0), dp)


@row_kernel
def _entmax_alpha_grad(p: Tensor, dp: Tensor, alpha: Tensor) -> Tensor:
    support = p > 0
    log_p = torch.where(support, p.log(), 0)
    g = torch.where(support, p.pow(2 - alpha), 0)
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


def _entmax_block(
    x: Tensor, alpha: float | Tensor, k: int | None, tol: float | None, compiled: bool
) -> Tensor:
    """alpha-entmax weights for one block of rows (alpha > 1 float, or (rows, 1) tensor >= 1)."""
    if is_exact_alpha(alpha):
        m, s = shifted_threshold(x, alpha, k, tol, compiled)
        weights = _sparsemax_weights if alpha == 2.0 else _entmax15_weights
        return weights(x, m, s, compiled=compiled)
    if isinstance(alpha, float):
        alpha = x.new_full((x.shape[0], 1), alpha)
    softmax_rows = alpha == 1
    solvable = torch.where(softmax_rows, 2.0, alpha)
    m, s = shifted_threshold(x, solvable, None, tol, compiled)
    scale = solvable - 1
    p = _tsallis_weights(x, m, scale, 1 / scale, s, compiled=compiled)
    if bool(softmax_rows.any()):
        p = torch.where(softmax_rows, _softmax_rows(x), p)
    return p


class _EntmaxFunction(torch.autograd.Function):
    """alpha-entmax over the last dim of a (rows, n) tensor; alpha float or (rows, 1)."""

    @staticmethod
    def forward(ctx, x, alpha, k, tol):
        out = torch.empty_like(x)
        work = compute_dtype(x.dtype)
        compiled = wants_compiled(x.numel(), x.device)
        for rows in row_blocks(x.shape[0], x.shape[1], compiled):
            block_alpha = alpha if isinstance(alpha, float) else alpha[rows].to(work)
            out[rows] = _entmax_block(x[rows].to(work), block_alpha, k, tol, compiled)
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
        grad_x = torch.empty_like(out) if ctx.needs_input_grad[0] else None
        alpha_needs_grad = isinstance(alpha, Tensor) and ctx.needs_input_grad[1]
        grad_alpha = torch.empty_like(alpha) if alpha_needs_grad else None
        for rows in row_blocks(out.shape[0], out.shape[1], compiled):
            p = out[rows].to(work)
            dp = grad_out[rows].to(work)
            if isinstance(alpha, Tensor):
                block_alpha = alpha[rows].to(work)
                if grad_alpha is not None:
                    grad_alpha[rows] = _entmax_alpha_grad(p, dp, block_alpha, compiled=compiled)
                if grad_x is not None:
                    grad_x[rows] = _entmax_grad(p, dp, block_alpha, compiled=compiled)
            elif grad_x is not None:
                grad_x[rows] = _grad_kernel(alpha, p, dp, compiled)
        return grad_x, grad_alpha, None, None


def _grad_kernel(alpha: float, p: Tensor, dp: Tensor, compiled: bool) -> Tensor:
    if alpha == 1.5:
        return _entmax15_grad(p, dp, compiled=compiled)
    if alpha == 2.0:
        return _sparsemax_grad(p, dp, compiled=compiled)
    return _entmax_grad(p, dp, torch.tensor(alpha, dtype=p.dtype), compiled=compiled)


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
        grad_x = torch.empty_like(out)
        for rows in row_blocks(out.shape[0], out.shape[1], compiled):
            grad_x[rows] = _softmax_grad(out[rows].to(work), grad_out[rows].to(work), compiled=compiled)
        return grad_x


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
    """
    x = check_scores(x)
    dim = check_dim(x, dim)
    alpha = check_alpha(alpha, x, dim)
    k = check_k(k)
    tol = check_tol(tol)
    if k is not None and not is_exact_alpha(alpha):
        raise ValueError(f"k (partial sort) applies only to alpha = 1.5 and 2, got alpha = {alpha}")
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
