"""The blocked backend: flash-style alpha-entmax attention for CPU and any torch device.

Queries are processed in blocks; a block's scores against the keys it can see
(causal attention stops at the block's last position) are computed, normalized
by the row-level entmax of :mod:`sparsa.normalize` (which iterates on the
candidate keys the sparsity certificate leaves), multiplied by V and dropped.
Only the row maxima and thresholds (m, s) are kept, O(Nq) per head; the
backward recomputes each block's weights from them (docs/mathematics.md, section 3):

    dP = dO V^T,  dS = g * (dP - sum(g dP) / sum(g)),  g = P^(2-alpha)
    dQ = scale dS K,  dK += scale dS^T Q,  dV += P^T dO

Grouped-query heads are handled by grouping the queries of the heads that
share a key/value head, so K and V are never repeated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..normalize._compile import wants_compiled
from ..normalize._validate import compute_dtype
from ..normalize.maps import entmax_rows, entmax_rows_backward, entmax_rows_from_threshold
from .masks import ScoreBias
from .stats import AttentionStats

# Score entries held at once per query block (all heads together): bounds memory, not work.
SCORE_BLOCK_BUDGET = 1 << 22
MAX_QUERY_BLOCK = 512
MIN_QUERY_BLOCK = 16


def query_block_size(batch: int, heads: int, n_k: int) -> int:
    size = SCORE_BLOCK_BUDGET // max(1, batch * heads * n_k)
    return max(MIN_QUERY_BLOCK, min(MAX_QUERY_BLOCK, size))


class _Layout:
    """Shapes and per-block views shared by the forward and the backward."""

    def __init__(self, q: Tensor, k: Tensor, alpha: float | Tensor, bias: ScoreBias) -> None:
        self.batch, self.heads, self.n_q, self.dim = q.shape
        self.kv_heads, self.n_k = k.shape[1], k.shape[2]
        self.group = self.heads // self.kv_heads
        self.work = compute_dtype(q.dtype)
        self.bias = bias
        self.alpha = alpha
        self.block = query_block_size(self.batch, self.heads, self.n_k)
        self.compiled = wants_compiled(self.batch * self.heads * self.block * self.n_k, q.device)

    def blocks(self):
        for start in range(0, self.n_q, self.block):
            end = min(start + self.block, self.n_q)
            yield start, end, self.bias.key_end(end)

    def grouped(self, x: Tensor, start: int, end: int) -> Tensor:
        """Rows start:end of a (B, H, Nq, X) tensor as (B, Hkv, group * rows, X) in the compute dtype."""
        rows = x[:, :, start:end].to(self.work)
        return rows.reshape(self.batch, self.kv_heads, self.group * (end - start), -1)

    def scores(self, q_rows: Tensor, k: Tensor, scale: float, start: int, end: int, keys: slice) -> Tensor:
        """Biased scores of a query block against a range of keys, as (B * H * rows, width)."""
        scores = (scale * q_rows) @ k[:, :, keys].transpose(-1, -2)
        width = scores.shape[-1]
        scores = self.bias.apply_(
            scores.view(self.batch, self.heads, end - start, width), start, end, keys.start
        )
        return scores.view(-1, width)

    def row_alpha(self, start: int, end: int) -> float | Tensor:
        if isinstance(self.alpha, float):
            return self.alpha
        per_head = self.alpha.to(self.work).view(1, self.heads, 1)
        return per_head.expand(self.batch, self.heads, end - start).reshape(-1, 1)


class BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, alpha_tensor, alpha_float, bias, scale, count_support):
        alpha = alpha_float if alpha_tensor is None else alpha_tensor.detach()
        layout = _Layout(q, k, alpha, bias)
        k_work, v_work = k.to(layout.work), v.to(layout.work)
        out = q.new_zeros(layout.batch, layout.heads, layout.n_q, v.shape[-1])
        m = q.new_zeros(layout.batch, layout.heads, layout.n_q, dtype=layout.work)
        s = torch.full_like(m, float("inf"))
        support = torch.zeros(m.shape, dtype=torch.long, device=q.device)
        # Per query block, the keys that carry weight: those before the first one that does in
        # any row are proven zero here and skipped by every later pass (weights @ V, the backward).
        key_ranges = []
        kept = 0
        for start, end, keys in layout.blocks():
            if keys == 0:
                key_ranges.append(slice(0, 0))
                continue
            q_rows = layout.grouped(q, start, end)
            scores = layout.scores(q_rows, k_work, scale, start, end, slice(0, keys))
            weights, block_m, block_s = entmax_rows(scores, layout.row_alpha(start, end), layout.compiled)
            # != 0 rather than > 0: a NaN row (NaN scores) keeps every key, so it stays NaN.
            live = (weights != 0).any(0)
            first = int(live.to(torch.uint8).argmax()) if bool(live.any()) else keys
            key_ranges.append(slice(first, keys))
            kept += (end - start) * (keys - first)
            grouped_weights = weights.view(layout.batch, layout.kv_heads, -1, keys)[..., first:]
            block_out = grouped_weights @ v_work[:, :, first:keys]
            out[:, :, start:end] = block_out.view(layout.batch, layout.heads, end - start, -1).to(out.dtype)
            m[:, :, start:end] = block_m.view(layout.batch, layout.heads, -1)
            s[:, :, start:end] = block_s.view(layout.batch, layout.heads, -1)
            if count_support:
                support[:, :, start:end] = (weights > 0).sum(-1).view(layout.batch, layout.heads, -1)
        ctx.save_for_backward(q, k, v, m, s, alpha_tensor)
        ctx.layout_args = (alpha, bias, scale, key_ranges)
        skipped = torch.tensor(1 - kept / max(1, layout.n_q * layout.n_k))
        ctx.mark_non_differentiable(m, s, support, skipped)
        return out, m, s, support, skipped

    @staticmethod
    def backward(ctx, grad_out, *_):
        q, k, v, m, s, alpha_tensor = ctx.saved_tensors
        alpha, bias, scale, key_ranges = ctx.layout_args
        layout = _Layout(q, k, alpha, bias)
        k_work, v_work = k.to(layout.work), v.to(layout.work)
        grad_q = torch.zeros(q.shape, dtype=layout.work, device=q.device)
        grad_k = torch.zeros(k.shape, dtype=layout.work, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=layout.work, device=v.device)
        alpha_grad = alpha_tensor is not None and ctx.needs_input_grad[3]
        grad_alpha = torch.zeros(layout.heads, dtype=layout.work, device=q.device) if alpha_grad else None
        for (start, end, _), keys in zip(layout.blocks(), key_ranges, strict=True):
            if keys.start == keys.stop:
                continue
            q_rows = layout.grouped(q, start, end)
            scores = layout.scores(q_rows, k_work, scale, start, end, keys)
            row_alpha = layout.row_alpha(start, end)
            block_m = m[:, :, start:end].reshape(-1, 1)
            block_s = s[:, :, start:end].reshape(-1, 1)
            weights = entmax_rows_from_threshold(scores, block_m, block_s, row_alpha, layout.compiled)
            del scores
            width = weights.shape[-1]
            grad_rows = layout.grouped(grad_out, start, end)
            grad_weights = (grad_rows @ v_work[:, :, keys].transpose(-1, -2)).reshape(-1, width)
            grad_scores, grad_row_alpha = entmax_rows_backward(
                weights, grad_weights, row_alpha, alpha_grad, layout.compiled
            )
            grad_scores = grad_scores.view(layout.batch, layout.kv_heads, -1, width) * scale
            grouped_weights = weights.view(layout.batch, layout.kv_heads, -1, width)
            block_grad_q = grad_scores @ k_work[:, :, keys]
            grad_q[:, :, start:end] = block_grad_q.view(layout.batch, layout.heads, end - start, -1)
            grad_k[:, :, keys] += grad_scores.transpose(-1, -2) @ q_rows
            grad_v[:, :, keys] += grouped_weights.transpose(-1, -2) @ grad_rows
            if grad_alpha is not None:
                grad_alpha += grad_row_alpha.view(layout.batch, layout.heads, -1).sum((0, 2))
        return (
            grad_q.to(q.dtype),
            grad_k.to(k.dtype),
            grad_v.to(v.dtype),
            None if grad_alpha is None else grad_alpha.to(alpha_tensor.dtype),
            None,
            None,
            None,
            None,
        )


def blocked_attention(
    q: Tensor, k: Tensor, v: Tensor, alpha: float | Tensor, bias: ScoreBias, scale: float, stats: bool
) -> tuple[Tensor, AttentionStats | None]:
    """alpha-entmax attention without materialising (Nq, Nk); alpha float or (H,)."""
    alpha_tensor = alpha if isinstance(alpha, Tensor) else None
    alpha_float = alpha if isinstance(alpha, float) else None
    out, m, s, support, skipped = BlockedAttention.apply(
        q, k, v, alpha_tensor, alpha_float, bias, scale, stats
    )
    if not stats:
        return out, None
    heads = q.shape[1]
    alpha_rows = (
        torch.as_tensor(alpha_float)
        if alpha_tensor is None
        else alpha_tensor.detach().to(m.dtype).view(1, heads, 1)
    )
    tau = torch.where(alpha_rows == 1, m + s, (alpha_rows - 1) * m + s)
    return out, AttentionStats(tau=tau, support=support, skipped_fraction=float(skipped))


class BlockedRowMapAttention(torch.autograd.Function):
    """Attention under a row map of normalize.rowmaps, query block by query block.

    The forward keeps only the output; the backward recomputes each block's
    scores and weights under autograd and backpropagates that block alone, so
    memory stays O(block x Nk) whatever the map's own backward needs.
    """

    @staticmethod
    def forward(ctx, q, k, v, function, options, names, bias, scale, *parameters):
        layout = _Layout(q, k, 1.0, bias)
        out = q.new_zeros(layout.batch, layout.heads, layout.n_q, v.shape[-1])
        with torch.no_grad():
            for start, end, keys in layout.blocks():
                if keys:
                    block = _row_map_block(
                        layout, q, k, v, function, options, names, parameters, scale, start, end, keys
                    )
                    out[:, :, start:end] = block.to(out.dtype)
        ctx.save_for_backward(q, k, v, *parameters)
        ctx.layout_args = (function, options, names, bias, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, *parameters = ctx.saved_tensors
        function, options, names, bias, scale = ctx.layout_args
        layout = _Layout(q, k, 1.0, bias)
        leaves = [x.detach().requires_grad_() for x in (q, k, v, *parameters)]
        grads = [torch.zeros_like(x, dtype=layout.work) for x in leaves]
        for start, end, keys in layout.blocks():
            if not keys:
                continue
            with torch.enable_grad():
                block = _row_map_block(
                    layout, *leaves[:3], function, options, names, leaves[3:], scale, start, end, keys
                )
                wanted = [i for i, leaf in enumerate(leaves) if i >= 3 or ctx.needs_input_grad[i]]
                found = torch.autograd.grad(
                    block,
                    [leaves[i] for i in wanted],
                    grad_out[:, :, start:end].to(block.dtype),
                    allow_unused=True,
                )
            for i, grad in zip(wanted, found, strict=True):
                if grad is not None:
                    grads[i] += grad
        grad_q, grad_k, grad_v, *grad_parameters = (g.to(x.dtype) for g, x in zip(grads, leaves, strict=True))
        return (grad_q, grad_k, grad_v, None, None, None, None, None, *grad_parameters)


def _row_map_block(layout, q, k, v, function, options, names, parameters, scale, start, end, keys):
    """Output rows start:end (B, H, rows, Dv) in the compute dtype, from the keys before ``keys``."""
    q_rows = layout.grouped(q, start, end)
    scores = layout.scores(q_rows, k.to(layout.work), scale, start, end, slice(0, keys))
    scores = scores.view(layout.batch, layout.heads, end - start, keys)
    weights = function(scores, **dict(zip(names, parameters, strict=True)), **options)
    grouped = weights.view(layout.batch, layout.kv_heads, -1, keys) @ v[:, :, :keys].to(layout.work)
    return grouped.view(layout.batch, layout.heads, end - start, -1)


def blocked_row_map_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    function,
    parameters: dict[str, Tensor],
    options: dict,
    bias: ScoreBias,
    scale: float,
) -> Tensor:
    """Attention with weights ``function(scores, **parameters, **options)``, never holding (Nq, Nk)."""
    names = tuple(parameters)
    return BlockedRowMapAttention.apply(q, k, v, function, options, names, bias, scale, *parameters.values())
