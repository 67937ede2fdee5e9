"""Launchers and the autograd.Function of the Triton backend; shapes are checked by sparsa.attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from ..masks import ScoreBias
from ..stats import AttentionStats
from . import kernels

MIN_DOT = 16


@dataclass(frozen=True)
class TileSizes:
    """Queries and keys per tile (powers of two, at least 16) and warps per program."""

    block_m: int = 32
    block_n: int = 32
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "num_warps"):
            value = getattr(self, name)
            least = 1 if name == "num_warps" else MIN_DOT
            if not isinstance(value, int) or value < least or value & (value - 1):
                raise ValueError(f"{name} must be a power of two of at least {least}, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> TileSizes:
        """'64x32x4' (block_m x block_n x num_warps), as the benchmark's command line writes them."""
        parts = text.split("x")
        if len(parts) != 3 or not all(part.isdigit() for part in parts):
            raise ValueError(f"tile sizes are written BLOCK_MxBLOCK_NxWARPS, e.g. 32x32x4, got {text!r}")
        return cls(*(int(part) for part in parts))

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.num_warps}"


DEFAULT_TILE_SIZES = TileSizes()


def _block(size: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(size))


class _Launch:
    """Everything the kernels take besides the tensors that change between forward and backward."""

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        alpha: Tensor,
        bias: ScoreBias,
        scale: float,
        sizes: TileSizes,
        sinks: Tensor | None = None,
    ):
        self.batch, self.heads, self.n_q, self.dim = q.shape
        self.kv_heads, self.n_k, self.value_dim = k.shape[1], k.shape[2], v.shape[3]
        self.group = self.heads // self.kv_heads
        self.tiles = (triton.cdiv(self.n_q, sizes.block_m), triton.cdiv(self.n_k, sizes.block_n))
        self.scale = scale
        self.alpha = alpha
        self.is_causal = bias.is_causal
        # No window: one that reaches past the first key for every query.
        self.window = self.n_k + self.n_q if bias.window is None else bias.window
        self.softcap = 1.0 if bias.softcap is None else bias.softcap
        self.sinks = alpha if sinks is None else sinks.detach().float().contiguous()
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
            "BLOCK_M": sizes.block_m,
            "BLOCK_N": sizes.block_n,
            "BLOCK_D": _block(self.dim),
            "BLOCK_DV": _block(self.value_dim),
            "IS_CAUSAL": self.is_causal,
            "HAS_ALIBI": self.has_alibi,
            "HAS_SOFTCAP": bias.softcap is not None,
            "HAS_SINKS": sinks is not None,
            # Bounds before scores: a far key tile's ALiBi bias rules it out (causal only, where the
            # tiles a query sees end at it).
            "PRESCORE": self.is_causal and self.has_alibi,
            "PAD": self.pad,
            # fp32 inputs get exact fp32 products, not TF32 (1e-3 error) on GPUs.
            "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
            "num_warps": sizes.num_warps,
        }

    def strides(self, q: Tensor, k: Tensor, v: Tensor, o: Tensor) -> list[int]:
        return [*q.stride(), *k.stride(), *v.stride(), *o.stride()]


def _unit_stride(x: Tensor) -> Tensor:
    """x itself when its last dimension is contiguous (the kernels take any other strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _output_like(q: Tensor, value_dim: int) -> Tensor:
    """(B, H, N, Dv) in q's layout: (B, N, H, Dv) memory when q is a view of (B, N, H, D), as from
    a model that splits its heads, so that merging them back copies nothing."""
    batch, heads, n_q, _ = q.shape
    if heads > 1 and n_q > 1 and q.stride(1) < q.stride(2):
        return q.new_empty(batch, n_q, heads, value_dim).transpose(1, 2)
    return q.new_empty(batch, heads, n_q, value_dim)


def forward(launch: _Launch, q: Tensor, k: Tensor, v: Tensor, alpha_grad: bool):
    out = _output_like(q, launch.value_dim)
    aux_shape = (launch.batch, launch.heads, launch.n_q, launch.value_dim)
    # U = sum g v / sum g is to the backward what O is to softmax's (delta = dO . U), and is kept in
    # O's precision as FlashAttention keeps O: half the memory of fp32 for fp16 and bf16 inputs.
    u = torch.empty(aux_shape, device=q.device, dtype=q.dtype)
    w = torch.empty(aux_shape, device=q.device, dtype=torch.float32) if alpha_grad else u
    stats = torch.empty(launch.batch, launch.heads, launch.n_q, 4, device=q.device, dtype=torch.float32)
    tile_shape = (launch.batch * launch.heads, *launch.tiles)
    tile_max = torch.full(tile_shape, float("-inf"), device=q.device, dtype=torch.float32)
    live = torch.zeros(tile_shape, device=q.device, dtype=torch.int8)
    passes = torch.empty(launch.batch * launch.heads, launch.tiles[0], device=q.device, dtype=torch.int32)
    unscored = torch.zeros(
        launch.batch * launch.heads, launch.tiles[0], 2, device=q.device, dtype=torch.int32
    )
    prescore = launch.constants["PRESCORE"]
    key_norms = _key_tile_norms(k, launch.constants["BLOCK_N"]) if prescore else tile_max
    grid = (launch.tiles[0], launch.batch * launch.heads)
    kernels._forward_kernel[grid](
        q, k, v, out, u, w, stats, tile_max, live, passes, unscored, key_norms, launch.alpha, launch.slopes,
        launch.lengths,
        launch.sinks, *launch.strides(q, k, v, out),
        launch.heads, launch.n_q, launch.n_k, launch.group, launch.scale, launch.slope_stride, launch.window,
        launch.softcap, *launch.tiles, kernels.NEWTON_TOLERANCE, kernels.MAX_PASSES,
        ALPHA_GRAD=alpha_grad, LEVELS=kernels.LEVELS, BOUND_ITERATIONS=kernels.BOUND_ITERATIONS,
        **launch.constants,
    )  # fmt: skip
    return out, u, (w if alpha_grad else None), stats, live, passes, unscored


def _key_tile_norms(k: Tensor, block_n: int) -> Tensor:
    """(B * Hkv, key tiles): the largest key norm of each tile of ``block_n`` keys (a NaN key gives NaN)."""
    norms = torch.linalg.vector_norm(k, dim=-1, dtype=torch.float32)
    norms = torch.nn.functional.pad(norms, (0, -norms.shape[-1] % block_n))
    return norms.view(k.shape[0] * k.shape[1], -1, block_n).amax(-1).contiguous()


def backward(launch: _Launch, q, k, v, d_out, stats, live, u):
    """dQ, dK, dV and delta = dO . U per row (which the gradient of a learnt alpha needs too)."""
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty(stats.shape[:-1], device=q.device, dtype=torch.float32)
    strides = launch.strides(q, k, v, d_out)
    grid = (launch.tiles[0], launch.batch * launch.heads)
    constants = launch.constants
    kernels._delta_kernel[grid](
        d_out, u, delta, *d_out.stride(), launch.heads, launch.n_q, VALUE_DIM=launch.value_dim,
        BLOCK_M=constants["BLOCK_M"], BLOCK_DV=constants["BLOCK_DV"], num_warps=constants["num_warps"],
    )  # fmt: skip
    kernels._backward_query_kernel[grid](
        q, k, v, d_out, dq, stats, live, delta, launch.alpha, launch.slopes, launch.lengths, *strides,
        launch.heads, launch.n_q, launch.n_k, launch.group, launch.scale, launch.slope_stride, launch.window,
        launch.softcap, *launch.tiles,
        **launch.constants,
    )  # fmt: skip
    grid = (launch.tiles[1], launch.batch * launch.kv_heads)
    kernels._backward_key_kernel[grid](
        q, k, v, d_out, dk, dv, stats, live, delta, launch.alpha, launch.slopes, launch.lengths, *strides,
        launch.heads, launch.kv_heads, launch.n_q, launch.n_k, launch.group, launch.scale,
        launch.slope_stride, launch.window, launch.softcap, *launch.tiles,
        **launch.constants,
    )  # fmt: skip
    return dq, dk, dv, delta


class TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, alpha, sinks, bias, scale, sizes):
        q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
        alpha_grad = alpha.requires_grad
        launch = _Launch(q, k, v, alpha.detach().float().contiguous(), bias, scale, sizes, sinks)
        out, u, w, stats, live, passes, unscored = forward(launch, q, k, v, alpha_grad)
        ctx.launch = launch
        ctx.save_for_backward(q, k, v, out, u, w if w is not None else u, stats, live)
        ctx.alpha_grad = alpha_grad
        ctx.sink_grad = sinks is not None and sinks.requires_grad
        ctx.mark_non_differentiable(stats, live, passes, unscored)
        return out, stats, live, passes, unscored

    @staticmethod
    def backward(ctx, d_out, *_):
        q, k, v, out, u, w, stats, live = ctx.saved_tensors
        d_out = _unit_stride(d_out)
        dq, dk, dv, delta = backward(ctx.launch, q, k, v, d_out, stats, live, u)
        d_alpha = None
        if ctx.alpha_grad:
            am1 = (ctx.launch.alpha - 1).view(1, -1, 1)
            d_work = d_out.float()
            first = (d_work * out.float()).sum(-1) - delta
            second = (d_work * w).sum(-1) - delta * stats[..., 2]
            d_alpha = (first / am1**2 - second / am1).sum((0, 2))
        d_sinks = None
        if ctx.sink_grad:
            # A sink's value is zero: dS = g (0 - delta), g = d^(1/(alpha-1) - 1) at its z - tau.
            am1 = (ctx.launch.alpha - 1).view(1, -1, 1)
            excess = (ctx.launch.sinks.view(1, -1, 1) - stats[..., 0]) * am1 - stats[..., 1]
            g = torch.where(excess > 0, excess.clamp_min(1e-30) ** (1 / am1 - 1), 0.0)
            d_sinks = -(g * delta).sum((0, 2))
        return dq, dk, dv, d_alpha, d_sinks, None, None, None


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float | Tensor,
    bias: ScoreBias,
    scale: float,
    stats: bool,
    sizes: TileSizes = DEFAULT_TILE_SIZES,
    sinks: Tensor | None = None,
) -> tuple[Tensor, AttentionStats | None]:
    """alpha-entmax attention in fused Triton kernels; alpha in (1, 2], float or (H,); sinks (H,) or None."""
    heads = q.shape[1]
    alpha_tensor = alpha if isinstance(alpha, Tensor) else torch.full((heads,), alpha, device=q.device)
    out, row_stats, live, passes, unscored = TritonAttention.apply(
        q, k, v, alpha_tensor, sinks, bias, scale, sizes
    )
    if not stats:
        return out, None
    am1 = (alpha_tensor.detach().float() - 1).view(1, heads, 1)
    tau = am1 * row_stats[..., 0] + row_stats[..., 1]
    return out, AttentionStats(
        tau=tau,
        support=row_stats[..., 3].long(),
        skipped_fraction=_skipped_fraction(live, q.shape[2], k.shape[2], sizes),
        threshold_passes=passes.view(q.shape[0], heads, -1),
        unscored_key_blocks=_unscored_share(unscored.view(q.shape[0], heads, -1, 2)),
    )


def _unscored_share(counts: Tensor) -> Tensor:
    """(H,): per head the share of (query tile, key tile) pairs in range that were never scored."""
    unscored, in_range = counts.sum(2).float().unbind(-1)
    return (unscored / in_range.clamp_min(1)).mean(0)


def _skipped_fraction(live: Tensor, n_q: int, n_k: int, sizes: TileSizes) -> float:
    """Share of the (Nq, Nk) entries in tiles that the output pass and the backward skip."""
    rows, keys = sizes.block_m, sizes.block_n
    rows_per_tile = (n_q - torch.arange(0, n_q, rows, device=live.device)).clamp(max=rows).float()
    keys_per_tile = (n_k - torch.arange(0, n_k, keys, device=live.device)).clamp(max=keys).float()
    kept_entries = torch.einsum("ij,i,j->", live.sum(0).float(), rows_per_tile, keys_per_tile)
    return 1.0 - float(kept_entries) / (live.shape[0] * n_q * n_k)
