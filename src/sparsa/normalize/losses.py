"""Fenchel-Young losses of the entmax family (docs/mathematics.md, section 2).

L(z, y) = H_alpha(p) + <p, z> - z_y with p = entmax_alpha(z) and the Tsallis
entropy H_alpha(p) = (1 - sum p^alpha) / (alpha (alpha-1)) (Shannon entropy at
alpha = 1, where the loss is the cross-entropy). The gradient is p - e_y. The
arguments follow ``torch.nn.functional.cross_entropy``: classes along dim 1
(dim 0 for unbatched input), ``ignore_index`` and ``reduction``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validate import check_alpha, check_scores, compute_dtype
from .maps import entmax

REDUCTIONS = ("none", "mean", "sum")


def _tsallis_entropy(p: Tensor, alpha: float) -> Tensor:
    if alpha == 1.0:
        return -torch.where(p > 0, p * p.log(), 0).sum(-1)
    return (1 - p.pow(alpha).sum(-1)) / (alpha * (alpha - 1))


class _FenchelYoungLoss(torch.autograd.Function):
    """Per-row loss of (rows, classes) scores; ignored rows give 0 and no gradient."""

    @staticmethod
    def forward(ctx, scores, target, alpha, ignore_index):
        work = compute_dtype(scores.dtype)
        z = scores.to(work)
        p = entmax(z, alpha)
        kept = target != ignore_index
        safe_target = torch.where(kept, target, 0).unsqueeze(-1)
        expected_score = torch.where(p > 0, p * z, 0).sum(-1)
        loss = _tsallis_entropy(p, alpha) + expected_score - z.gather(-1, safe_target).squeeze(-1)
        grad = p.scatter_add(-1, safe_target, -torch.ones_like(safe_target, dtype=work))
        grad = grad.masked_fill(~kept.unsqueeze(-1), 0)
        ctx.save_for_backward(grad)
        ctx.input_dtype = scores.dtype
        return loss.masked_fill(~kept, 0)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.unsqueeze(-1)).to(ctx.input_dtype), None, None, None


def entmax_loss(
    input: Tensor,
    target: Tensor,
    alpha: float = 1.5,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Fenchel-Young loss of alpha-entmax; alpha = 1 is the cross-entropy.

    Args:
        input: scores (C,), (N, C) or (N, C, d1, ...), classes along dim 1
            (dim 0 when unbatched).
        target: class indices of shape (), (N,) or (N, d1, ...).
        alpha: a float >= 1.
        ignore_index: targets with this value contribute no loss or gradient.
        reduction: "none", "mean" (over targets not ignored; 0 when all are
            ignored) or "sum".
    """
    input = check_scores(input, "input")
    if not isinstance(target, Tensor) or target.is_floating_point() or target.is_complex():
        raise TypeError("target must be an integer tensor of class indices")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(alpha, Tensor):
        raise TypeError("alpha of a loss must be a float")
    alpha = check_alpha(alpha, input, 0)
    class_dim = 0 if input.dim() == 1 else 1
    expected = input.shape[:class_dim] + input.shape[class_dim + 1 :]
    if target.shape != expected:
        raise ValueError(
            f"target must have shape {tuple(expected)} for input of shape {tuple(input.shape)}, "
            f"got {tuple(target.shape)}"
        )
    classes = input.shape[class_dim]
    kept = target != ignore_index
    if bool(((target < 0) | (target >= classes))[kept].any()):
        raise ValueError(f"target values must be in [0, {classes}) or equal ignore_index ({ignore_index})")
    rows = input.movedim(class_dim, -1).reshape(-1, classes)
    loss = _FenchelYoungLoss.apply(rows, target.reshape(-1), alpha, ignore_index).reshape(expected)
    if reduction == "none":
        return loss.to(input.dtype)
    total = loss.sum()
    if reduction == "mean":
        total = total / kept.sum().clamp_min(1)
    return total.to(input.dtype)


def sparsemax_loss(
    input: Tensor, target: Tensor, *, ignore_index: int = -100, reduction: str = "mean"
) -> Tensor:
    """Sparsemax loss: :func:`entmax_loss` with alpha = 2."""
    return entmax_loss(input, target, 2.0, ignore_index=ignore_index, reduction=reduction)


def entmax15_loss(
    input: Tensor, target: Tensor, *, ignore_index: int = -100, reduction: str = "mean"
) -> Tensor:
    """1.5-entmax loss: :func:`entmax_loss` with alpha = 1.5."""
    return entmax_loss(input, target, 1.5, ignore_index=ignore_index, reduction=reduction)
