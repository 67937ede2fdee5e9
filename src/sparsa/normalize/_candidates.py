"""The entries a threshold solver iterates on: whole rows, or the blocks that can matter.

An entry whose shifted score y = (alpha-1)(x - m) lies at or below a lower bound
of the shifted threshold has weight zero (docs/mathematics.md, section 1: -1 is always
such a bound, and every solver step from the left gives a tighter one). Rows
are cut into blocks of ``BLOCK`` entries; once a bound rules out all but a
small fraction of every row's blocks, the kept blocks are gathered into a
narrow (rows, K*BLOCK) matrix, padded with -inf blocks for rows that keep
fewer than K, and the solver continues on it. Thresholds and weights
computed that way are exact, and far cheaper to iterate on for long,
attention-like rows. Entries past the last whole block are always kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 16
MIN_BLOCKS = 8
# Gathering costs about two passes over the rows; iterate on the candidates only
# when they are at most this fraction of each row.
MAX_KEPT_FRACTION = 0.25
NARROWING_ATTEMPTS = 3
# Bounds come from rounded arithmetic: keep blocks this close below them.
BOUND_MARGIN = 1e-4


class Entries:
    """The entries of a block of rows x (rows, n) that a solver iterates on (``values``).

    ``narrowing=False`` keeps whole rows (for problems too small to gain from it).
    """

    def __init__(self, x: Tensor, narrowing: bool = True) -> None:
        self.values = x
        self.length = x.shape[-1]
        self.order: Tensor | None = None
        blocks = self.length // BLOCK
        self.whole = blocks * BLOCK
        self._attempts = NARROWING_ATTEMPTS if narrowing and blocks >= MIN_BLOCKS else 0
        if self._attempts:
            self._tiled = x[:, : self.whole].reshape(x.shape[0], blocks, BLOCK)
            # One reduction: compiling it gains nothing and recompiles for every view shape.
            self._block_max = self._tiled.amax(-1)

    def row_maxima(self) -> Tensor:
        """Maximum of each row (rows, 1), from the block maxima when there are some."""
        if not self._attempts:
            return self.values.amax(-1, keepdim=True)
        m = self._block_max.amax(-1, keepdim=True)
        if self.whole < self.length:
            m = torch.maximum(m, self.values[:, self.whole :].amax(-1, keepdim=True))
        return m

    def set_shift(self, m: Tensor, scale: Tensor | float) -> None:
        """Row maxima and alpha - 1: the units of the bounds that :meth:`narrow` receives."""
        if self._attempts:
            self._shifted_block_max = (self._block_max - m) * scale

    def summary(self) -> Tensor | None:
        """Block maxima and tail entries: a subset of every row, or None for short rows.

        The threshold of a subset is a lower bound of the row's threshold
        (fewer terms in a decreasing sum), and a close one for attention-like rows.
        """
        if not self._attempts:
            return None
        return torch.cat([self._block_max, self.values[:, self.whole :]], -1)

    def narrow(self, lower_bound: Tensor) -> None:
        """Switch to the candidate blocks if ``lower_bound`` (rows, 1) rules out enough of the rows."""
        if self._attempts == 0:
            return
        self._attempts -= 1
        keep = self._shifted_block_max > lower_bound - BOUND_MARGIN
        kept = int(keep.sum(-1).max())
        if kept * BLOCK + self.length - self.whole > MAX_KEPT_FRACTION * self.length:
            return
        rows = keep.shape[0]
        order = keep.to(torch.uint8).topk(kept, -1, sorted=True).indices
        row_index = torch.arange(rows, device=keep.device).unsqueeze(-1)
        gathered = self._tiled[row_index, order].masked_fill(
            ~keep[row_index, order].unsqueeze(-1), -torch.inf
        )
        tail = self._tiled.new_empty(0) if self.whole == self.length else self.values[:, self.whole :]
        self.values = torch.cat([gathered.reshape(rows, kept * BLOCK), tail.reshape(rows, -1)], -1)
        self.order = order
        self._attempts = 0
        del self._tiled, self._shifted_block_max, self._block_max

    def expand(self, weights: Tensor) -> Tensor:
        """Weights of the whole rows (rows, n) from the weights of ``values``; entries left out get zero."""
        if self.order is None:
            return weights
        rows, kept = self.order.shape
        out = weights.new_zeros(rows, self.length)
        tiled = out[:, : self.whole].view(rows, -1, BLOCK)
        gathered = weights[:, : kept * BLOCK].reshape(rows, kept, BLOCK)
        tiled.scatter_(1, self.order.unsqueeze(-1).expand(rows, kept, BLOCK), gathered)
        out[:, self.whole :] = weights[:, kept * BLOCK :]
        return out
