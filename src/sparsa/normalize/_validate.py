"""Argument checks and the row layout shared by the normalizers."""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import torch
from torch import Tensor


def check_scores(x: object, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    return x


def check_dim(x: Tensor, dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}] for a {x.dim()}-d input, got {dim}")
    return dim % x.dim()


def check_k(k: int | None, alpha: float | Tensor) -> int | None:
    """k (partial sort) must be a positive int, and only the exact maps (alpha 1.5 and 2) sort."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int or None, got {k!r}")
    if not is_exact_alpha(alpha):
        raise ValueError(f"k (partial sort) applies only to alpha = 1.5 and 2, got alpha = {alpha}")
    return k


def check_tol(tol: float | None) -> float | None:
    if tol is not None and not (isinstance(tol, Real) and 0 < tol < 1):
        raise ValueError(f"tol must be a number in (0, 1) or None, got {tol!r}")
    return None if tol is None else float(tol)


def check_alpha(alpha: float | Tensor, x: Tensor, dim: int) -> float | Tensor:
    """Return alpha as a float, or as a tensor broadcastable to x with size 1 along dim.

    A tensor that needs no gradient and holds one value becomes a float, so the
    fast exact paths apply to it.
    """
    if isinstance(alpha, Tensor):
        if not alpha.is_floating_point():
            raise TypeError(f"alpha must be a float or a floating-point tensor, got {alpha.dtype}")
        if alpha.dim() > x.dim():
            raise ValueError(f"alpha has {alpha.dim()} dimensions, more than x's {x.dim()}")
        shape = (1,) * (x.dim() - alpha.dim()) + tuple(alpha.shape)
        if shape[dim] != 1:
            raise ValueError(
                f"alpha must have size 1 along dim {dim} (one alpha per row), got shape {tuple(alpha.shape)}"
            )
        try:
            torch.broadcast_shapes(shape, x.shape)
        except RuntimeError:
            raise ValueError(
                f"alpha of shape {tuple(alpha.shape)} does not broadcast to x of shape {tuple(x.shape)}"
            ) from None
        values = alpha.detach()
        if bool((torch.isnan(values) | (values < 1) | torch.isinf(values)).any()):
            raise ValueError("alpha must be finite and >= 1 everywhere")
        if alpha.numel() == 1 and not alpha.requires_grad:
            return float(values.reshape(()))
        return alpha.reshape(shape)
    if isinstance(alpha, bool) or not isinstance(alpha, Real):
        raise TypeError(f"alpha must be a float or a tensor, got {type(alpha).__name__}")
    alpha = float(alpha)
    if math.isnan(alpha) or alpha < 1 or math.isinf(alpha):
        raise ValueError(f"alpha must be finite and >= 1, got {alpha}")
    return alpha


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in fp32; fp32 and fp64 as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def to_rows(x: Tensor, dim: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """A (rows, n) view or copy of x with dim last, and the map of (rows, any) back to x's layout."""
    moved = x.movedim(dim, -1)
    shape = moved.shape
    rows = moved.reshape(math.prod(shape[:-1]), shape[-1])

    def restore(result: Tensor) -> Tensor:
        return result.reshape(*shape[:-1], result.shape[-1]).movedim(-1, dim)

    return rows, restore


def alpha_rows(alpha: Tensor, x: Tensor, dim: int) -> Tensor:
    """Per-row alpha of shape (rows, 1) matching :func:`to_rows` of x."""
    expanded = alpha.expand(*x.shape[:dim], 1, *x.shape[dim + 1 :])
    return expanded.movedim(dim, -1).reshape(-1, 1)


def is_exact_alpha(alpha: float | Tensor) -> bool:
    """Whether alpha selects one of the exact algorithms (1.5-entmax, sparsemax)."""
    return isinstance(alpha, float) and alpha in (1.5, 2.0)
