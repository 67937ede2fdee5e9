"""Launchers and the autograd.Function of the Triton backend; shapes are checked by sparsa.attention."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..masks import ScoreBias
from ..stats import AttentionStats
from . import kernels

BLOCK_M = 32
BLOCK_N = 32
MIN_DOT = 16


def _block(size: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(size))


class _Launch:
    """Everything the kernels take besides the tensors that change between forward and backward."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, bias: ScoreBias, scale: float):
        self.batch, self.heads, self.n_q, self.dim = q.shape
        self.kv_heads, self.n_k, self.value_dim = k.shape[1], k.shape[2], v.shape[3]
        self.group = self.heads // self.kv_heads
        self.tiles = (triton.cdiv(self.n_q, BLOCK_M), triton.cdiv(self.n_k, BLOCK_N))
        self.scale = scale
        self.alpha = alpha
        self.is_causal = bias.is_causal
        slopes = bias.slopes
        self.has_alibi = slopes is not None
        if slopes is None:
            self.slopes, self.slope_stride = alpha, 0
        else:
            per_batch = slopes.shape[0] > 1
            self.slopes = slopes.reshape(slopes.shape[0], self.heads).float().contiguous()
            self.slope_stride = self.heads if per_batch else 0
        if bias.padding_lengths is None:
            self.pad, self.lengths = 0, alpha
        else:
            self.pad = 1 if bias.padding_side == "right" else 2
            self.lengths = bias.padding_lengths.view(-1).to(torch.int32).contiguous()
        self.constants = {
            "HEAD_DIM": self.dim,
            "VALUE_DIM": self.value_dim,
            "BLOCK_M": BLOCK_M,
            "BLOCK_N": BLOCK_N,
            "BLOCK_D": _block(self.dim),
            "BLOCK_DV": _block(self.value_dim),
            "IS_CAUSAL": self.is_causal,
            "HAS_ALIBI": self.has_alibi,
            "PAD": self.pad,
            # fp32 inputs get exact fp32 products, not TF32 (1e-3 error) on GPUs.
            "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        }

    def strides(self, q: Tensor, k: Tensor, v: Tensor, o: Tensor) -> list[int]:
        return [*q.stride(), *k.stride(), *v.stride(), *o.stride()]


def forward(launch: _Launch, q: Tensor, k: Tensor, v: Tensor, alpha_grad: bool):
    out = q.new_empty(launch.batch, launch.heads, launch.n_q, launch.value_dim)
    aux_shape = (launch.batch, launch.heads, launch.n_q, launch.value_dim)
    u = torch.empty(aux_shape, device=q.device, dtype=torch.float32)
    w = torch.empty(aux_shape, device=q.device, dtype=torch.float32) if alpha_grad else u
    stats = torch.empty(launch.batch, launch.heads, launch.n_q, 4, device=q.device, dtype=torch.float32)
    tile_shape = (launch.batch * launch.heads, *launch.tiles)
    tile_max = torch.full(tile_shape, float("-inf"), device=q.device, dtype=torch.float32)
    live = torch.zeros(tile_shape, device=q.device, dtype=torch.int8)
    passes = torch.empty(launch.batch * launch.heads, launch.tiles[0], device=q.device, dtype=torch.int32)
    grid = (launch.tiles[0], launch.batch * launch.heads)
    kernels._forward_kernel[grid](
        q, k, v, out, u, w, stats, tile_max, live, passes, launch.alpha, launch.slopes, launch.lengths,
        *launch.strides(q, k, v, out),
        launch.heads, launch.n_q, launch.n_k, launch.group, launch.scale, launch.slope_stride,
        *launch.tiles, kernels.NEWTON_TOLERANCE, kernels.MAX_PASSES,
        ALPHA_GRAD=alpha_grad, LEVELS=kernels.LEVELS, BOUND_ITERATIONS=kernels.BOUND_ITERATIONS,
        **launch.constants,
    )  # fmt: skip
    return out, u, (w if alpha_grad else None), stats, live, passes


def backward(launch: _Launch, q, k, v, d_out, stats, live, delta):
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    strides = launch.strides(q, k, v, d_out)
    grid = (launch.tiles[0], launch.batch * launch.heads)
    kernels._backward_query_kernel[grid](
        q, k, v, d_out, dq, stats, live, delta, launch.alpha, launch.slopes, launch.lengths, *strides,
        launch.heads, launch.n_q, launch.n_k, launch.group, launch.scale, launch.slope_stride, *launch.tiles,
        **launch.constants,
    )  # fmt: skip
    grid = (launch.tiles[1], launch.batch * launch.kv_heads)
    kernels._backward_key_kernel[grid](
        q, k, v, d_out, dk, dv, stats, live, delta, launch.alpha, launch.slopes, launch.lengths, *strides,
        launch.heads, launch.kv_heads, launch.n_q, launch.n_k, launch.group, launch.scale,
        launch.slope_stride, *launch.tiles,
        **launch.constants,
    )  # fmt: skip
    return dq, dk, dv


class TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, alpha, bias, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        alpha_grad = alpha.requires_grad
        launch = _Launch(q, k, v, alpha.detach().float().contiguous(), bias, scale)
        out, u, w, stats, live, passes = forward(launch, q, k, v, alpha_grad)
        ctx.launch = launch
        ctx.save_for_backward(q, k, v, out, u, w if w is not None else u, stats, live)
        ctx.alpha_grad = alpha_grad
        ctx.mark_non_differentiable(stats, live, passes)
        return out, stats, live, passes

    @staticmethod
    def backward(ctx, d_out, *_):
        q, k, v, out, u, w, stats, live = ctx.saved_tensors
        d_out = d_out.contiguous() if d_out.stride(-1) != 1 else d_out
        d_work = d_out.float()
        delta = (d_work * u).sum(-1).contiguous()
        dq, dk, dv = backward(ctx.launch, q, k, v, d_out, stats, live, delta)
        d_alpha = None
        if ctx.alpha_grad:
            am1 = (ctx.launch.alpha - 1).view(1, -1, 1)
            first = (d_work * out.float()).sum(-1) - delta
            second = (d_work * w).sum(-1) - delta * stats[..., 2]
            d_alpha = (first / am1**2 - second / am1).sum((0, 2))
        return dq, dk, dv, d_alpha, None, None


def triton_attention(
    q: Tensor, k: Tensor, v: Tensor, alpha: float | Tensor, bias: ScoreBias, scale: float, stats: bool
) -> tuple[Tensor, AttentionStats | None]:
    """alpha-entmax attention in fused Triton kernels; alpha in (1, 2], float or (H,)."""
    heads = q.shape[1]
    alpha_tensor = alpha if isinstance(alpha, Tensor) else torch.full((heads,), alpha, device=q.device)
    out, row_stats, live, passes = TritonAttention.apply(q, k, v, alpha_tensor, bias, scale)
    if not stats:
        return out, None
    am1 = (alpha_tensor.detach().float() - 1).view(1, heads, 1)
    tau = am1 * row_stats[..., 0] + row_stats[..., 1]
    return out, AttentionStats(
        tau=tau,
        support=row_stats[..., 3].long(),
        skipped_fraction=_skipped_fraction(live, q.shape[2], k.shape[2]),
        threshold_passes=passes.view(q.shape[0], heads, -1),
    )


def _skipped_fraction(live: Tensor, n_q: int, n_k: int) -> float:
    """Share of the (Nq, Nk) entries in tiles that the output pass and the backward skip."""
    rows_per_tile = (n_q - torch.arange(0, n_q, BLOCK_M, device=live.device)).clamp(max=BLOCK_M).float()
    keys_per_tile = (n_k - torch.arange(0, n_k, BLOCK_N, device=live.device)).clamp(max=BLOCK_N).float()
    kept_entries = torch.einsum("bij,i,j->", live.float(), rows_per_tile, keys_per_tile)
    return 1.0 - float(kept_entries) / (live.shape[0] * n_q * n_k)
