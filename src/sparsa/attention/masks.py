"""Everything that is added to, masks or caps attention scores, computed once per block.

Positions follow torch's convention for ``is_causal`` with Nq <= Nk: query i
sits at position Nk - Nq + i and key j at position j, so a chunk of queries
at the end of a longer key sequence (chunked prefill, one-token decoding)
sees the same causal mask and ALiBi biases as in the full sequence. Every
backend builds its biases here, block by block, so no backend re-derives them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NEG_INF = float("-inf")


@dataclass(frozen=True)
class KeyPadding:
    """Key padding given by lengths instead of an (Nq, Nk) mask.

    ``lengths`` (B,) counts the real keys of each batch entry; they are the
    first ``lengths[b]`` keys (``side="right"``: padding after them) or the
    last ones (``side="left"``: padding before them).
    """

    lengths: Tensor
    side: str = "right"

    def __post_init__(self) -> None:
        if not isinstance(self.lengths, Tensor) or self.lengths.dim() != 1:
            raise ValueError("KeyPadding.lengths must be a 1-d tensor of per-batch key counts")
        if self.lengths.is_floating_point() or self.lengths.is_complex():
            raise TypeError("KeyPadding.lengths must be an integer tensor")
        if self.side not in ("left", "right"):
            raise ValueError(f"KeyPadding.side must be 'left' or 'right', got {self.side!r}")

    @classmethod
    def of_causal_mask(cls, mask: Tensor, window: int | None = None) -> KeyPadding | None:
        """The padding that with ``is_causal=True`` (and ``window``) masks exactly as ``mask`` does,
        or None if none does.

        ``mask``: bool (B, 1, Nq, Nk), True = keep, Nq <= Nk. A causal mask
        over left- or right-padded keys (what transformers builds for padded
        batches) becomes lengths, which the fused kernels take and a mask
        tensor they do not. Under a window, padding that no query's window
        reaches cannot be told apart from real keys there; the lengths then
        count only the keys some window reaches, which attends the same.
        """
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] > mask.shape[3]:
            return None
        _, _, n_q, n_k = mask.shape
        seen = mask[:, 0].any(1)
        positions = torch.arange(n_k, device=mask.device)
        any_seen = seen.any(-1)
        last_seen = torch.where(seen, positions, -1).amax(-1)
        first_seen = torch.where(seen, positions, n_k).amin(-1)
        # Query i sits at key position Nk - Nq + i (the module docstring); compared in bool, a byte per entry.
        q_pos = torch.arange(n_q, device=mask.device)[:, None] + (n_k - n_q)
        visible = positions[None, :] <= q_pos
        if window is not None:
            visible = visible & (positions[None, :] > q_pos - window)
        for padding in (
            cls(torch.where(any_seen, last_seen + 1, 0), "right"),
            cls(torch.where(any_seen, n_k - first_seen, 0), "left"),
        ):
            real = positions < padding.lengths[:, None]
            if padding.side == "left":
                real = positions >= n_k - padding.lengths[:, None]
            if torch.equal(real[:, None, None, :] & visible, mask):
                return padding
        return None


class ScoreBias:
    """Causal mask, sliding window, ALiBi, an explicit mask and key padding for scores of shape
    (B, H, Nq, Nk), and the soft cap of the content scores they are added to."""

    def __init__(
        self,
        batch: int,
        heads: int,
        n_q: int,
        n_k: int,
        *,
        is_causal: bool,
        attn_mask: Tensor | KeyPadding | None,
        alibi_slopes: Tensor | None,
        device: torch.device,
        window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        self.batch, self.heads = batch, heads
        self.n_q, self.n_k = n_q, n_k
        self.offset = n_k - n_q
        self.is_causal = is_causal
        self.device = device
        self.mask: Tensor | None = None
        self.padding_lengths: Tensor | None = None  # (B, 1, 1, 1)
        self.padding_side = "right"
        if isinstance(attn_mask, KeyPadding):
            if attn_mask.lengths.shape[0] != batch:
                raise ValueError(
                    f"KeyPadding.lengths has {attn_mask.lengths.shape[0]} entries for a batch of {batch}"
                )
            if bool(((attn_mask.lengths < 0) | (attn_mask.lengths > n_k)).any()):
                raise ValueError(f"KeyPadding.lengths must lie in [0, {n_k}]")
            self.padding_lengths = attn_mask.lengths.to(device).view(-1, 1, 1, 1)
            self.padding_side = attn_mask.side
        elif attn_mask is not None:
            self.mask = _check_mask(attn_mask, (batch, heads, n_q, n_k))
        self.slopes = None if alibi_slopes is None else _check_slopes(alibi_slopes, batch, heads)
        # A window that reaches back past the first key hides nothing: the same as none.
        self.window = window if window is not None and window < n_k else None
        self.softcap = softcap

    def capped(self, scores: Tensor) -> Tensor:
        """:func:`soft_capped` content scores."""
        return soft_capped(scores, self.softcap)

    def cap_(self, scores: Tensor) -> Tensor:
        """:meth:`capped` in place (not differentiable); the cap is increasing, so it also caps bounds."""
        if self.softcap is not None:
            scores.div_(self.softcap).tanh_().mul_(self.softcap)
        return scores

    def cap_slope(self, capped: Tensor) -> Tensor | None:
        """d capped / d score, 1 - (capped / c)^2, from the capped scores; None without a cap."""
        return None if self.softcap is None else 1 - (capped / self.softcap) ** 2

    def key_start(self, q_start: int) -> int:
        """Keys before this index lie outside the window of every query from ``q_start`` on."""
        return 0 if self.window is None else max(0, self.offset + q_start - self.window + 1)

    def key_end(self, q_end: int) -> int:
        """Keys at or after this index are masked for every query before ``q_end``."""
        return min(self.n_k, self.offset + q_end) if self.is_causal else self.n_k

    def apply_(self, scores: Tensor, q_start: int, q_end: int, k_start: int = 0) -> Tensor:
        """Add the biases in place to scores (B, H, q_end - q_start, width) of keys from k_start on.

        Works in place so that no second (rows, keys) tensor is allocated per
        block; the causal mask touches only the keys past the block's first
        query position.
        """
        k_end = k_start + scores.shape[-1]
        q_pos = torch.arange(q_start, q_end, device=self.device).view(-1, 1) + self.offset
        if self.slopes is not None:
            k_pos = torch.arange(k_start, k_end, device=self.device).view(1, -1)
            scores.add_(self.slopes.to(scores.dtype) * (k_pos - q_pos).to(scores.dtype))
        if self.is_causal:
            first = max(k_start, min(k_end, q_start + self.offset + 1))
            k_pos = torch.arange(first, k_end, device=self.device).view(1, -1)
            scores[..., first - k_start :].masked_fill_(k_pos > q_pos, NEG_INF)
        if self.window is not None and k_start < self.key_start(q_end - 1):
            last = min(k_end, self.key_start(q_end - 1))
            k_pos = torch.arange(k_start, last, device=self.device).view(1, -1)
            scores[..., : last - k_start].masked_fill_(k_pos <= q_pos - self.window, NEG_INF)
        if self.padding_lengths is not None:
            k_pos = torch.arange(k_start, k_end, device=self.device).view(1, -1)
            lengths = self.padding_lengths
            pad = self._is_padding(k_pos, k_pos, lengths)
            scores.masked_fill_(pad, NEG_INF)
        if self.mask is not None:
            mask = self._mask_rows(q_start, q_end)
            mask = mask[..., k_start:k_end] if mask.shape[-1] > 1 else mask
            if mask.dtype == torch.bool:
                scores.masked_fill_(~mask, NEG_INF)
            else:
                scores.add_(mask.to(scores.dtype))
        return scores

    def _mask_rows(self, q_start: int, q_end: int) -> Tensor:
        """The explicit mask's rows of queries q_start:q_end (all of it when it broadcasts over queries)."""
        return self.mask[..., q_start:q_end, :] if self.mask.shape[-2] > 1 else self.mask

    def _is_padding(self, first: Tensor, last: Tensor, lengths: Tensor) -> Tensor:
        """Whether the keys from ``first`` to ``last`` (a key: first = last) are all padding."""
        return first >= lengths if self.padding_side == "right" else last < self.n_k - lengths

    def block_bound(self, q_start: int, q_end: int, blocks: Tensor, block: int, dtype: torch.dtype) -> Tensor:
        """An upper bound on the bias of each key block for each query, (B|1, H|1, rows, len(blocks)).

        ``blocks`` (n,) numbers key blocks of ``block`` keys (block b holds keys
        b * block up to the next block or Nk). -inf marks a block that the causal
        mask, the padding or a bool mask hides from that query entirely; a
        float mask contributes its largest value over the block.
        """
        first = blocks * block
        last = torch.clamp_max(first + block, self.n_k) - 1
        q_pos = torch.arange(q_start, q_end, device=self.device).view(-1, 1) + self.offset
        bound = torch.zeros(1, 1, q_end - q_start, blocks.numel(), dtype=dtype, device=self.device)
        if self.is_causal:
            last = torch.minimum(last.view(1, -1), q_pos)
            bound.masked_fill_(first.view(1, -1) > q_pos, NEG_INF)
        if self.window is not None:
            bound.masked_fill_(last <= q_pos - self.window, NEG_INF)
        if self.slopes is not None:
            slopes = self.slopes.to(bound.dtype)
            nearest = torch.where(slopes >= 0, last - q_pos, first - q_pos)
            bound = bound + slopes * nearest
        if self.padding_lengths is not None:
            lengths = self.padding_lengths
            hidden = self._is_padding(first, last, lengths)
            bound = torch.where(hidden, NEG_INF, bound)
        if self.mask is not None:
            bound = bound + self._mask_block_maxima(q_start, q_end, blocks, block, dtype)
        return bound

    def _mask_block_maxima(self, q_start: int, q_end: int, blocks: Tensor, block: int, dtype) -> Tensor:
        mask = self._mask_rows(q_start, q_end)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill_(~mask, NEG_INF)
        mask = mask.to(dtype)
        if mask.shape[-1] == 1:
            return mask
        padded = torch.nn.functional.pad(mask, (0, -self.n_k % block), value=NEG_INF)
        maxima = padded.view(*mask.shape[:-1], -1, block).amax(-1)
        return maxima[..., blocks]

    def apply_at_(
        self,
        scores: Tensor,
        q_start: int,
        q_end: int,
        batch: Tensor,
        heads: Tensor,
        positions: Tensor,
        row_starts: Tensor | None = None,
        contiguous: bool = False,
    ) -> Tensor:
        """Add the biases in place to scores (U, G, rows, W) of gathered keys.

        Unit u holds the queries q_start:q_end of heads ``heads[u]`` (G,) of
        batch entry ``batch[u]`` against the keys at ``positions[u]`` (W,); a
        negative position is no key and gets -inf. ``row_starts`` (U,), if
        given, moves unit u's queries on by ``row_starts[u]`` (not with an
        explicit mask, whose rows are shared by all units). ``contiguous``:
        every unit's positions are the same run of keys, first, first + 1, ...
        (then the causal mask touches only the keys past the first query).
        """
        units = scores.shape[0]
        if positions.numel() == 0:
            return scores
        q_pos = torch.arange(q_start, q_end, device=self.device).view(1, 1, -1, 1) + self.offset
        k_pos = positions.view(units, 1, 1, -1)
        # Each pass over the scores costs as much as computing them: skip those that change nothing.
        lowest, highest = int(positions.min()), int(positions.max())
        if row_starts is not None:
            if self.mask is not None:
                raise ValueError("apply_at_ takes row_starts only without an explicit mask")
            q_pos = q_pos + row_starts.view(units, 1, 1, 1)
            q_start, q_end = q_start + int(row_starts.min()), q_end + int(row_starts.max())
        if self.slopes is not None:
            slopes = self.slopes.view(self.slopes.shape[0], -1)
            unit_slopes = slopes[batch.view(-1, 1) if slopes.shape[0] > 1 else 0, heads]
            if bool((unit_slopes != 0).any()):
                distance = (k_pos - q_pos).to(scores.dtype)
                scores.add_(unit_slopes.view(units, -1, 1, 1).to(scores.dtype) * distance)
        hidden = k_pos < 0 if lowest < 0 else None
        if self.is_causal and contiguous and row_starts is None:
            first = max(0, q_start + self.offset + 1 - lowest)
            if first < scores.shape[-1]:
                tail = k_pos[..., first:]
                scores[..., first:].masked_fill_(tail > q_pos, NEG_INF)
        elif self.is_causal and highest > q_start + self.offset:
            hidden = k_pos > q_pos if hidden is None else hidden | (k_pos > q_pos)
        if self.window is not None and lowest < self.key_start(q_end - 1):
            outside = k_pos <= q_pos - self.window
            hidden = outside if hidden is None else hidden | outside
        if self.padding_lengths is not None:
            lengths = self.padding_lengths.view(-1)[batch].view(units, 1, 1, 1)
            pad = self._is_padding(k_pos, k_pos, lengths)
            hidden = pad if hidden is None else hidden | pad
        if hidden is not None:
            scores.masked_fill_(hidden, NEG_INF)
        if self.mask is not None:
            mask = self._mask_rows(q_start, q_end)
            mask = mask.expand(self.batch, self.heads, *mask.shape[2:])[batch.view(-1, 1), heads]
            if mask.shape[-1] > 1:
                index = positions.clamp_min(0).view(units, 1, 1, -1)
                mask = mask.gather(-1, index.expand(*mask.shape[:-1], index.shape[-1]))
            if mask.dtype == torch.bool:
                scores.masked_fill_(~mask, NEG_INF)
            else:
                scores.add_(mask.to(scores.dtype))
        return scores


def soft_capped(scores: Tensor, softcap: float | None) -> Tensor:
    """Content scores (scale q.k) under a soft cap, c tanh(s / c), applied before any bias (as Gemma 2
    caps them); unchanged without a cap. Differentiable and increasing, so it also caps bounds."""
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def _check_mask(mask: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"attn_mask must be a tensor, a KeyPadding or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"attn_mask must be bool (True = keep) or floating (added to scores), got {mask.dtype}"
        )
    if mask.dim() > 4:
        raise ValueError(f"attn_mask has {mask.dim()} dimensions; at most 4 (B, H, Nq, Nk)")
    if mask.requires_grad:
        raise ValueError("attn_mask must not require grad: sparsa does not differentiate through masks")
    mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    try:
        torch.broadcast_shapes(mask.shape, shape)
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to {shape}") from None
    return mask


def _check_slopes(slopes: Tensor, batch: int, heads: int) -> Tensor:
    if not isinstance(slopes, Tensor) or not slopes.is_floating_point():
        raise TypeError("alibi_slopes must be a floating-point tensor of shape (H,) or (B, H)")
    if slopes.shape == (heads,):
        return slopes.view(1, heads, 1, 1)
    if slopes.shape == (batch, heads):
        return slopes.view(batch, heads, 1, 1)
    raise ValueError(
        f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}), got {tuple(slopes.shape)}"
    )
