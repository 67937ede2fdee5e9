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

From MIN_BOUNDED_KEYS keys on, a query block first scores its seed (the keys
near it), and key blocks whose upper bound (key minima and maxima, ALiBi
distance, masks) falls below every row's cut-off are never scored, forward or
backward; each query block's plan (:class:`_Plan`) records which keys each
unit scored (docs/mathematics.md, "Key blocks ruled out before they are scored").
"""

from __future__ import annotations

from typing import NamedTuple

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
# Keys that one bound rules out at once; the bounds cost about 2 / KEY_BLOCK of the scores.
KEY_BLOCK = 64
# A block is ruled out only when its bound is this far (relative) below the threshold: about a
# thousand times the fp32 rounding of a score, so rounding never hides a key that holds weight.
BOUND_SLACK = 1e-4
# Units with few live key blocks join a wider bucket when the padding costs less than this share.
MERGE_SLACK = 0.05
# How far a query block grows once bounds rule blocks out: each row scores the seed, about half
# the query block, so past this the seed costs more than the Python work per block saves.
MAX_GROWN_QUERY_BLOCK = 128
# Shorter key sequences are scored whole: measured on CPU (1k-token training steps), the bounds'
# bookkeeping there costs more than the scores it saves.
MIN_BOUNDED_KEYS = 2048
# The key summaries read every key three times (maxima, minima, norms), which only query blocks that
# skip scoring can repay: with fewer blocks than this (one decoding query over a long cache) they cost
# more than they save; one query over 256k keys took 5x its dense time with them.
MIN_BOUNDED_QUERY_BLOCKS = 4
# Up to this many units that score every key run their products one by one over views of the
# keys; more units pay less per call for a copy of their keys and one batched product.
PER_UNIT_LOOP_MAX = 8


# Causal ALiBi heads score their queries' windows first (:class:`_Band`): blocks of BAND query rows,
# each with its own keys and the BAND keys before them.
BAND = 64
# The band starts with this many blocks of every eligible unit; a unit goes on in the band only if
# at least BAND_KEEP_SHARE of them were done there (gentle slopes keep weight beyond the window).
BAND_PROBE_BLOCKS = 8
BAND_KEEP_SHARE = 0.5


def _rounded_up(size: int, step: int) -> int:
    return -(-size // step) * step


def query_block_size(batch: int, heads: int, n_k: int) -> int:
    size = SCORE_BLOCK_BUDGET // max(1, batch * heads * n_k)
    return max(MIN_QUERY_BLOCK, min(MAX_QUERY_BLOCK, size))


class _Bucket(NamedTuple):
    """Units (b * Hkv + kv head) of one query block that score the same keys' count, and which.

    Two kinds: with ``blocks`` None the units (``units`` None: every unit)
    score the contiguous keys from ``first`` to the last visible one (a tail);
    otherwise unit ``units[i]`` scores key blocks ``blocks[i]`` (-1 pads) and
    then the seed keys, those near the query block that every unit scored first.
    """

    units: Tensor | None
    blocks: Tensor | None
    seed: slice
    first: int = 0

    def positions(self, keys: int) -> Tensor:
        """(U, W) indices of the keys scored, -1 where a padding block holds none."""
        if self.blocks is None:
            return torch.arange(self.first, keys, device=self.units.device).expand(self.units.numel(), -1)
        units = self.blocks.shape[0]
        offsets = torch.arange(KEY_BLOCK, device=self.blocks.device)
        gathered = (self.blocks[..., None] * KEY_BLOCK + offsets).view(units, -1)
        gathered = torch.where(gathered < keys, gathered, -1)
        seed = torch.arange(self.seed.start, self.seed.stop, device=self.blocks.device)
        return torch.cat([gathered, seed.expand(units, -1)], -1)

    def unscored(self, keys: int) -> Tensor | int:
        """How many of the visible key blocks each unit leaves unscored."""
        visible = -(-keys // KEY_BLOCK)
        if self.blocks is None:
            return self.first // KEY_BLOCK
        seed_blocks = -(-(self.seed.stop - self.seed.start) // KEY_BLOCK)
        return visible - seed_blocks - (self.blocks >= 0).sum(-1)

    def keys_of(self, flat: Tensor, keys: int, positions: Tensor | None) -> Tensor | list[Tensor]:
        """The bucket's rows of flat keys or values (B * Hkv, Nk, X): one tensor (U, W, X), or for
        the listed units over every key, a view per unit (no copy)."""
        if self.units is None:
            return flat[:, self.first : keys]
        if self.blocks is None:
            if self.loops:
                return [flat[unit, self.first : keys] for unit in self.units.tolist()]
            return flat[self.units, self.first : keys]
        return flat[self.units.view(-1, 1), positions.clamp_min(0)]

    @property
    def loops(self) -> bool:
        """Whether products run unit by unit over views of every key (few units, long keys) rather
        than over a copy of the units' keys."""
        return self.blocks is None and self.units is not None and self.units.numel() <= PER_UNIT_LOOP_MAX

    def rows_of(self, x: Tensor) -> Tensor:
        return x if self.units is None else x[self.units]

    def among(self, units: Tensor | None) -> _Bucket:
        """This bucket of the units numbered 0, 1, ... within ``units`` (None: all of them), with the
        units' own numbers."""
        if units is None:
            return self
        return self._replace(units=units if self.units is None else units[self.units])

    def accumulate(self, grad: Tensor, keys: int, positions: Tensor | None, a: Tensor, b: Tensor) -> None:
        """grad (B * Hkv, Nk + 1, X) += a^T b at the bucket's keys; a (U, rows, W), b (U, rows, X).
        The spare last key row takes what padding positions receive (zeros)."""
        if self.units is None:
            grad[:, self.first : keys].baddbmm_(a.transpose(-1, -2), b)
        elif self.loops:
            for i, unit in enumerate(self.units.tolist()):
                grad[unit, self.first : keys].addmm_(a[i].T, b[i])
        elif self.blocks is None:
            grad[self.units, self.first : keys] += a.transpose(-1, -2) @ b
        else:
            index = (self.units.view(-1, 1), torch.where(positions >= 0, positions, grad.shape[1] - 1))
            grad.index_put_(index, a.transpose(-1, -2) @ b, accumulate=True)


def _times(a: Tensor, b: Tensor | list[Tensor], transpose: bool = False) -> Tensor:
    """a (U, rows, X) times b (U, X, W), or times each b[i] of a list (then without copying b)."""
    if isinstance(b, Tensor):
        return a @ (b.transpose(-1, -2) if transpose else b)
    width = b[0].shape[0 if transpose else 1] if b else 0
    out = a.new_empty(a.shape[0], a.shape[1], width)
    for i, matrix in enumerate(b):
        torch.mm(a[i], matrix.T if transpose else matrix, out=out[i])
    return out


class _Layout:
    """Shapes and per-block views shared by the forward and the backward."""

    def __init__(
        self, q: Tensor, k: Tensor, alpha: float | Tensor, bias: ScoreBias, sinks: Tensor | None = None
    ) -> None:
        self.batch, self.heads, self.n_q, self.dim = q.shape
        self.kv_heads, self.n_k = k.shape[1], k.shape[2]
        self.group = self.heads // self.kv_heads
        self.units = self.batch * self.kv_heads
        self.work = compute_dtype(q.dtype)
        self.bias = bias
        self.alpha = alpha
        self.sinks = None if sinks is None else sinks.detach().to(self.work)
        self.block = query_block_size(self.batch, self.heads, self.n_k)
        if bias.window is not None:
            # Each row scores the block's span plus the window: blocks about as long as the window
            # keep the scores outside every row's window under half of those computed.
            self.block = max(MIN_QUERY_BLOCK, min(self.block, bias.window))
        self.compiled = wants_compiled(self.batch * self.heads * self.block * self.n_k, q.device)
        unit = torch.arange(self.units, device=q.device)
        self.unit_batch = unit // self.kv_heads
        self.unit_heads = (unit % self.kv_heads).view(-1, 1) * self.group + torch.arange(
            self.group, device=q.device
        )

    def blocks(self):
        """Query blocks (start, end, first key visible, end of the keys visible) of the default size,
        before any plan."""
        for start in range(0, self.n_q, self.block):
            end = min(start + self.block, self.n_q)
            yield start, end, self.bias.key_start(start), self.bias.key_end(end)

    def reach(self, start: int) -> int:
        """The first key of the first key block that a query block from ``start`` on can see."""
        return self.bias.key_start(start) // KEY_BLOCK * KEY_BLOCK

    def grouped(self, x: Tensor, start: int, end: int) -> Tensor:
        """Rows start:end of a (B, H, Nq, X) tensor as (B * Hkv, group * rows, X) in the compute dtype."""
        rows = x[:, :, start:end].to(self.work)
        return rows.reshape(self.units, self.group * (end - start), -1)

    def per_unit(self, x: Tensor, start: int, end: int, bucket: _Bucket, value: Tensor) -> None:
        """Write ``value`` (U, group * rows, ...) to columns start:end of a (B, H, Nq, ...) tensor."""
        view = x.view(self.units, self.group, *x.shape[2:])[:, :, start:end]
        value = value.reshape(-1, self.group, end - start, *x.shape[3:]).to(x.dtype)
        if bucket.units is None:
            view.copy_(value)
        else:
            view[bucket.units] = value

    def unit_rows(self, x: Tensor, start: int, end: int, bucket: _Bucket) -> Tensor:
        """Columns start:end of a (B, H, Nq) tensor for the bucket's units, as (U * group * rows, 1)."""
        view = x.view(self.units, self.group, -1)[:, :, start:end]
        return bucket.rows_of(view).reshape(-1, 1)

    def grouped_queries(self, q: Tensor, scale: float) -> Tensor:
        """The scaled queries (B, H, Nq, D) as (B * Hkv, group, Nq, D) in the compute dtype."""
        return (scale * q.to(self.work)).reshape(self.units, self.group, self.n_q, -1)

    def band_units(self) -> Tensor | None:
        """The units whose every head has a positive ALiBi slope and alpha > 1 under a causal mask
        with no explicit mask (those :class:`_Band` can serve), or None if there are none."""
        bias = self.bias
        if not bias.is_causal or bias.mask is not None or bias.slopes is None or self.n_q < 2 * BAND:
            return None
        slopes = bias.slopes.view(-1, self.heads).expand(self.batch, -1)
        eligible = (slopes[self.unit_batch.view(-1, 1), self.unit_heads] > 0).all(-1)
        alpha = torch.as_tensor(self.alpha, device=eligible.device)
        eligible &= (alpha.view(-1)[self.unit_heads] > 1).all(-1) if alpha.dim() else bool(alpha > 1)
        units = torch.nonzero(eligible).view(-1)
        return units if units.numel() else None

    def flat(self, x: Tensor) -> Tensor:
        """Keys or values (B, Hkv, Nk, X) as (B * Hkv, Nk, X) in the compute dtype."""
        return x.to(self.work).reshape(self.units, self.n_k, -1)

    def scores(
        self, q_rows: Tensor, k: Tensor, start: int, end: int, keys: slice, out=None, units=None
    ) -> Tensor:
        """Biased scores (B * Hkv, rows, width) of scaled query rows (B * Hkv, rows, D) against
        keys ``keys`` of the flat k, in ``out`` if given (not differentiable then); with ``units``
        (a tensor), (U, rows, width) for those units only."""
        if units is not None:
            return self.unit_scores(
                q_rows, k, start, end, keys, units, loops=units.numel() <= PER_UNIT_LOOP_MAX
            )
        if out is None:
            out = self.bias.capped(q_rows @ k[:, keys].transpose(-1, -2))
        else:
            self.bias.cap_(torch.bmm(q_rows, k[:, keys].transpose(-1, -2), out=out))
        self.bias.apply_(out.view(self.batch, self.heads, end - start, -1), start, end, keys.start)
        return out

    def scores_around(self, bucket: _Bucket, q_rows, k, seed_scores, start: int, end: int, keys: int):
        """A tail's scores over keys [first, keys): the seed's (``seed_scores``, the bucket's
        units' rows) copied, the rest computed."""
        units = q_rows.shape[0] if bucket.units is None else bucket.units.numel()
        first, seed = bucket.first, bucket.seed
        if first == seed.start and seed.stop == keys:
            return seed_scores
        out = q_rows.new_empty(units, q_rows.shape[1], keys - first)
        out[..., seed.start - first : seed.stop - first] = seed_scores
        for rest in (slice(first, seed.start), slice(seed.stop, keys)):
            if rest.stop == rest.start:
                continue
            held = out[..., rest.start - first : rest.stop - first]
            if bucket.units is None:
                self.scores(q_rows, k, start, end, rest, out=held)
            else:
                self.unit_scores(q_rows, k, start, end, rest, bucket.units, held, bucket.loops)
        return out

    def unit_scores(self, q_rows, k, start: int, end: int, keys: slice, units: Tensor, out=None, loops=False):
        """Biased scores (U, rows, width) of the listed units' scaled query rows against keys ``keys``
        of the flat k, in ``out`` if given; ``loops``: one product per unit over views of k."""
        if out is None:
            out = q_rows.new_empty(units.numel(), q_rows.shape[1], keys.stop - keys.start)
        if loops:
            for i, unit in enumerate(units.tolist()):
                torch.mm(q_rows[unit], k[unit, keys].T, out=out[i])
        else:
            torch.bmm(q_rows[units], k[units, keys].transpose(-1, -2), out=out)
        self.bias.cap_(out)
        view = out.view(units.numel(), self.group, end - start, -1)
        positions = torch.arange(keys.start, keys.stop, device=out.device).expand(units.numel(), -1)
        batch, heads = self.unit_batch[units], self.unit_heads[units]
        self.bias.apply_at_(view, start, end, batch, heads, positions, contiguous=True)
        return out

    def bucket_scores(
        self, bucket: _Bucket, q_rows: Tensor, k, positions, start: int, end: int
    ) -> tuple[Tensor, Tensor | None]:
        """Biased scores (U, rows, W) of a bucket's scaled query rows against its keys ``k``
        (from :meth:`_Bucket.keys_of`) at ``positions``, and the soft cap's slope at them (None
        without a cap)."""
        scores = self.bias.cap_(_times(bucket.rows_of(q_rows), k, transpose=True))
        slope = self.bias.cap_slope(scores)
        if bucket.units is None:
            self.bias.apply_(scores.view(self.batch, self.heads, end - start, -1), start, end, bucket.first)
        else:
            units = bucket.units
            view = scores.view(units.numel(), self.group, end - start, -1)
            self.bias.apply_at_(view, start, end, self.unit_batch[units], self.unit_heads[units], positions)
        return scores, slope

    def sink_rows(self, start: int, end: int, units: Tensor | None = None) -> Tensor | None:
        """(U, group * rows, 1): the sink logit of each query row of the units; None without sinks."""
        if self.sinks is None:
            return None
        heads = self.unit_heads if units is None else self.unit_heads[units]
        return self.sinks[heads][..., None].expand(-1, -1, end - start).reshape(heads.shape[0], -1, 1)

    def with_sinks(self, scores: Tensor, start: int, end: int, units: Tensor | None) -> Tensor:
        """Scores (U, rows, W) with each row's sink as one more column (the last), if there are sinks."""
        sink = self.sink_rows(start, end, units)
        return scores if sink is None else torch.cat([scores, sink], -1)

    def row_alpha(self, start: int, end: int, units: Tensor | None = None) -> float | Tensor:
        if isinstance(self.alpha, float):
            return self.alpha
        per_head = self.alpha.to(self.work).view(1, self.heads, 1)
        rows = per_head.expand(self.batch, self.heads, end - start).reshape(self.units, -1)
        return (rows if units is None else rows[units]).reshape(-1, 1)

    @property
    def prunes(self) -> bool:
        """Whether any row can give a key zero weight (alpha > 1 somewhere): only then do bounds pay."""
        return bool((torch.as_tensor(self.alpha) > 1).any())

    def seed(self, start: int, end: int, keys: int) -> slice:
        """The whole key blocks from one block before the queries' positions on (within the
        window), up to ``keys``."""
        first = max(self.reach(start), ((self.bias.offset + start) // KEY_BLOCK - 1) * KEY_BLOCK)
        last = (
            keys
            if self.bias.is_causal
            else min(keys, -(-(self.bias.offset + end) // KEY_BLOCK + 1) * KEY_BLOCK)
        )
        return slice(min(first, keys), last)


class _KeyBounds:
    """Per key block coordinate maxima and minima of the keys, (B * Hkv, blocks, 2 D), and their norms."""

    def __init__(self, k: Tensor) -> None:
        """``k``: the flat keys (B * Hkv, Nk, D)."""
        whole = k.shape[1] // KEY_BLOCK * KEY_BLOCK
        blocks = [k[:, :whole].unflatten(1, (-1, KEY_BLOCK))]
        if whole < k.shape[1]:
            blocks.append(k[:, None, whole:])
        self.extremes = torch.cat([torch.cat([b.amax(2), b.amin(2)], -1) for b in blocks], 1)
        self.largest_norm = k.norm(dim=-1).amax(-1)

    def live(
        self,
        layout: _Layout,
        q_rows: Tensor,
        seed_scores: Tensor,
        start: int,
        end: int,
        keys: int,
        seed: slice,
        units: Tensor | None = None,
    ):
        """(B * Hkv, n) bool over the key blocks in reach outside the seed (also returned, (n,);
        the seed leaves at least one): which a unit must score because some row's bound on them
        reaches the cut-off that the seed keys alone prove. With ``units`` (a tensor), (U, n) for
        those units only, whose rows ``seed_scores`` then holds."""
        n_blocks = -(-keys // KEY_BLOCK)
        candidates = torch.arange(layout.reach(start) // KEY_BLOCK, n_blocks, device=q_rows.device)
        candidates = candidates[
            (candidates < seed.start // KEY_BLOCK) | (candidates * KEY_BLOCK >= seed.stop)
        ]
        count = layout.units if units is None else units.numel()
        if units is not None:
            q_rows = q_rows[units]
        alpha = torch.as_tensor(layout.row_alpha(start, end, units), dtype=layout.work, device=q_rows.device)
        alpha = alpha.view(-1) if alpha.dim() else alpha
        # No weight exceeds 1, so a row's cut-off is at least its largest score less 1 / (alpha - 1),
        # and the seed's largest score is at most the row's (docs/mathematics.md). (The exact
        # threshold of the seed's top scores ruled out no more blocks on the lookup model, at 20x the cost.)
        largest = seed_scores.amax(-1).view(-1)
        sink = layout.sink_rows(start, end, units)
        if sink is not None:
            # The sink is one more score of the row: the largest may be it.
            largest = torch.maximum(largest, sink.view(-1))
        cutoff = torch.where(alpha > 1, largest - 1 / (alpha - 1).clamp_min(1e-30), float("-inf"))
        # A +inf score makes its row NaN: NaN keeps every block, as the dense path would.
        cutoff = torch.where(largest == float("inf"), float("nan"), cutoff).view(count, -1, 1)
        signed = torch.cat([q_rows.clamp_min(0), q_rows.clamp_max(0)], -1)
        extremes = self.extremes if units is None else self.extremes[units]
        content = layout.bias.cap_(signed @ extremes[:, candidates].transpose(-1, -2))
        position = layout.bias.block_bound(start, end, candidates, KEY_BLOCK, layout.work)
        position = position.expand(layout.batch, layout.heads, end - start, -1)
        position = position.reshape(layout.units, *content.shape[1:])
        position = position if units is None else position[units]
        largest_norm = self.largest_norm if units is None else self.largest_norm[units]
        slack = BOUND_SLACK * (
            1 + cutoff.abs() + q_rows.norm(dim=-1, keepdim=True) * largest_norm.view(-1, 1, 1)
        )
        # A NaN anywhere fails the comparison and keeps its block: NaN rows stay NaN.
        ruled_out = content + position < cutoff - slack
        return ~ruled_out.all(1), candidates


class _Band:
    """Query rows of heads with a positive ALiBi slope under a causal mask, in blocks of BAND rows
    that each score only their window: their own keys and the BAND keys before them.

    Every window of every block is scored by one batched product (no Python
    work per block). A row is done in its window when a bound on all earlier
    keys, its content bound against every key of the unit (coordinate maxima
    and minima) plus the bias at the window's edge, -slope * (distance to the
    edge), lies below the cut-off that the window's largest score proves
    (docs/mathematics.md, "Key blocks ruled out before they are scored"). A
    block of a unit is done when all its rows are; after :meth:`run`, ``done``
    (B * Hkv, blocks) says which (unit, block) pairs the band finished.
    """

    def __init__(self, layout: _Layout, q_rows: Tensor, flat_k: Tensor, flat_v: Tensor) -> None:
        """``q_rows``: the scaled queries as (B * Hkv, group, Nq, D)."""
        self.layout = layout
        self.blocks = -(-layout.n_q // BAND)
        pad_front = BAND - layout.bias.offset % BAND
        # Key position p sits at index p + pad_front: window b is chunks c and c + 1, c = chunk(b).
        self.first_chunk = (layout.bias.offset + pad_front) // BAND - 1
        pad_back = (self.first_chunk + self.blocks + 1) * BAND - pad_front - layout.n_k
        padding = (0, 0, pad_front, pad_back)
        self.k_chunks = torch.nn.functional.pad(flat_k, padding).unflatten(1, (-1, BAND))
        self.v_chunks = torch.nn.functional.pad(flat_v, padding).unflatten(1, (-1, BAND))
        rows = torch.nn.functional.pad(q_rows, (0, 0, 0, self.blocks * BAND - layout.n_q))
        self.q_blocks = rows.unflatten(2, (-1, BAND))

    def window_start(self, blocks: Tensor | int) -> Tensor | int:
        """The key position of the first key of block ``blocks``' window (negative: none there)."""
        return self.layout.bias.offset + (blocks - 1) * BAND

    def windows(self, chunks: Tensor, units: Tensor, blocks: Tensor) -> Tensor:
        """(P, 2 BAND, X): the window of each (unit, block) pair of padded keys or values."""
        first = self.first_chunk + blocks
        return torch.cat([chunks[units, first], chunks[units, first + 1]], 1)

    def positions(self, blocks: Tensor) -> Tensor:
        """(P, 2 BAND) key positions of the pairs' windows, -1 where no key is."""
        positions = self.window_start(blocks).view(-1, 1) + torch.arange(2 * BAND, device=blocks.device)
        return torch.where((positions >= 0) & (positions < self.layout.n_k), positions, -1)

    def queries(self, units: Tensor, blocks: Tensor) -> Tensor:
        """(P, group * BAND, D): the pairs' scaled query rows, zero past the last query."""
        return self.q_blocks[units, :, blocks].flatten(1, 2)

    def scores(self, units: Tensor, blocks: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Biased scores (P, group * BAND, 2 BAND) of the pairs' windows, their key positions and
        the soft cap's slope at them (None without a cap)."""
        layout = self.layout
        scores = layout.bias.cap_(self.queries(units, blocks) @ self.windows(self.k_chunks, units, blocks).mT)
        slope = layout.bias.cap_slope(scores)
        positions = self.positions(blocks)
        view = scores.view(units.numel(), layout.group, BAND, -1)
        batch, heads = layout.unit_batch[units], layout.unit_heads[units]
        layout.bias.apply_at_(view, 0, BAND, batch, heads, positions, row_starts=blocks * BAND)
        return scores, positions, slope

    def certified(self, units: Tensor, blocks: Tensor, scores: Tensor, extremes: Tensor, norms: Tensor):
        """(P,) bool: whether every row of each pair is done in its window; ``extremes`` (units, 2 D)
        the coordinate maxima and minima of each unit's keys, ``norms`` (units,) their largest norm."""
        layout = self.layout
        rows = self.queries(units, blocks)
        alpha = layout.row_alpha(0, BAND, units)
        alpha = torch.as_tensor(alpha, dtype=layout.work, device=rows.device).view(-1, 1)
        alpha = alpha.expand(units.numel() * layout.group * BAND, 1).view(units.numel(), -1)
        largest = scores.amax(-1)
        sink = layout.sink_rows(0, BAND, units)
        if sink is not None:
            largest = torch.maximum(largest, sink.squeeze(-1))
        cutoff = largest - 1 / (alpha - 1)
        signed = torch.cat([rows.clamp_min(0), rows.clamp_max(0)], -1)
        content = layout.bias.cap_((signed @ extremes[units, :, None]).squeeze(-1))
        slopes = layout.bias.slopes.view(-1, layout.heads).expand(layout.batch, -1)
        slopes = slopes[layout.unit_batch[units, None], layout.unit_heads[units]].to(layout.work)
        # A key before the window is at least BAND + r + 1 positions before query row r.
        distance = torch.arange(BAND + 1, 2 * BAND + 1, device=rows.device, dtype=layout.work)
        edge = (slopes[..., None] * distance).view(units.numel(), -1)
        slack = BOUND_SLACK * (1 + cutoff.abs() + rows.norm(dim=-1) * norms[units, None])
        # NaN anywhere fails the comparison: the row is left to the blocks that score every key.
        done = content - edge < cutoff - slack
        # No key lies before the window, or the sliding window already hides all of them.
        first_visible = 0
        if layout.bias.window is not None:
            first_visible = (layout.bias.offset + blocks * BAND - layout.bias.window + 1).clamp_min(0)
        nothing_before = self.window_start(blocks) <= first_visible
        past_end = (blocks.view(-1, 1) * BAND + torch.arange(BAND, device=rows.device)) >= layout.n_q
        past_end = past_end.view(-1, 1, BAND).expand(-1, layout.group, -1).reshape(done.shape)
        # Rows whose whole window is masked (padding) are left to the loop, like every row it has.
        seen = (largest > float("-inf")) | past_end
        return ((done | past_end).all(-1) | nothing_before) & seen.all(-1)

    def run(self, units: Tensor, bounds: _KeyBounds, out, m, s, support, count_support: bool) -> int:
        """Score the windows of ``units`` (a probe of the first blocks, then the rest for the units
        that the probe found mostly done), write the done pairs' outputs, row maxima, thresholds
        and support, and return how many scores it computed (one per query row and key)."""
        layout = self.layout
        self.done = torch.zeros(layout.units, self.blocks, dtype=torch.bool, device=units.device)
        dim = layout.dim
        extremes = torch.cat([bounds.extremes[..., :dim].amax(1), bounds.extremes[..., dim:].amin(1)], -1)
        probe = min(self.blocks, BAND_PROBE_BLOCKS)
        outputs = (out, m, s, support, count_support)
        scored = self._pass(units, torch.arange(probe, device=units.device), extremes, bounds, *outputs)
        if probe < self.blocks:
            # Block 0 has no keys before its window: it is done whatever the slopes.
            kept = units[self.done[units, 1:probe].float().mean(-1) >= BAND_KEEP_SHARE]
            if kept.numel():
                rest = torch.arange(probe, self.blocks, device=units.device)
                scored += self._pass(kept, rest, extremes, bounds, *outputs)
        return scored

    def _pass(self, units, blocks, extremes, bounds, out, m, s, support, count_support: bool) -> int:
        layout = self.layout
        pair_units = units.repeat_interleave(blocks.numel())
        pair_blocks = blocks.repeat(units.numel())
        chunk = max(1, SCORE_BLOCK_BUDGET // (layout.group * BAND * 2 * BAND))
        scored = 0
        for first in range(0, pair_units.numel(), chunk):
            chosen, chosen_blocks = pair_units[first : first + chunk], pair_blocks[first : first + chunk]
            scores, _, _ = self.scores(chosen, chosen_blocks)
            scored += scores.numel()
            done = self.certified(chosen, chosen_blocks, scores, extremes, bounds.largest_norm)
            self.done[chosen, chosen_blocks] = done
            if not bool(done.any()):
                continue
            chosen, chosen_blocks, scores = chosen[done], chosen_blocks[done], scores[done]
            row_scores = layout.with_sinks(scores, 0, BAND, chosen)
            weights, block_m, block_s = entmax_rows(
                row_scores.view(-1, row_scores.shape[-1]), layout.row_alpha(0, BAND, chosen), layout.compiled
            )
            weights = weights.view(row_scores.shape)[..., : scores.shape[-1]]
            index, real = self.rows_index(chosen, chosen_blocks)
            pairs = chosen.numel()
            for target, value in (
                (out, weights @ self.windows(self.v_chunks, chosen, chosen_blocks)),
                (m, block_m),
                (s, block_s),
                (support, (weights > 0).sum(-1) if count_support else None),
            ):
                if value is None:
                    continue
                view = target.view(layout.units, layout.group, layout.n_q, *target.shape[3:])
                value = value.reshape(pairs, layout.group, BAND, *target.shape[3:])
                view[tuple(i[real] for i in index)] = value[real].to(target.dtype)
        return scored

    def backward(
        self, pairs: Tensor, grad_out: Tensor, m: Tensor, s: Tensor, scale: float, grads, alpha_grad
    ):
        """Add the gradients of the (unit, block) ``pairs`` that the band did to ``grads`` (grad_q
        (B, H, Nq, D), grad_k and grad_v (B * Hkv, Nk + 1, X) with a spare last key row, grad_alpha
        and grad_sinks (H,) or None); the same equations as :meth:`BlockedAttention.backward`."""
        layout = self.layout
        grad_q, grad_k, grad_v, grad_alpha, grad_sinks = grads
        grad_rows = layout.grouped_queries(grad_out, 1.0)
        grad_rows = torch.nn.functional.pad(grad_rows, (0, 0, 0, self.blocks * BAND - layout.n_q))
        grad_rows = grad_rows.unflatten(2, (-1, BAND))
        by_row = [x.view(layout.units, layout.group, layout.n_q, *x.shape[3:]) for x in (m, s, grad_q)]
        chunk = max(1, SCORE_BLOCK_BUDGET // (layout.group * BAND * 2 * BAND))
        for first in range(0, pairs.shape[0], chunk):
            units, blocks = pairs[first : first + chunk].unbind(-1)
            index, real = self.rows_index(units, blocks)
            scores, positions, slope = self.scores(units, blocks)
            keys_width = scores.shape[-1]
            scores = layout.with_sinks(scores, 0, BAND, units)
            width = scores.shape[-1]
            row_alpha = layout.row_alpha(0, BAND, units)
            block_m = by_row[0][index].reshape(-1, 1)
            # Rows past the last query get no weight (an infinite threshold).
            block_s = torch.where(real, by_row[1][index], float("inf")).reshape(-1, 1)
            weights = entmax_rows_from_threshold(
                scores.view(-1, width), block_m, block_s, row_alpha, layout.compiled
            )
            del scores
            unit_grad = grad_rows[units, :, blocks].flatten(1, 2)
            values = self.windows(self.v_chunks, units, blocks)
            grad_weights = torch.nn.functional.pad(unit_grad @ values.mT, (0, width - keys_width))
            grad_scores, grad_row_alpha = entmax_rows_backward(
                weights, grad_weights.view(-1, width), row_alpha, alpha_grad, layout.compiled
            )
            grad_scores = grad_scores.view(units.numel(), -1, width)
            weights = weights.view(grad_scores.shape)[..., :keys_width]
            heads = layout.unit_heads[units]
            if grad_sinks is not None:
                per_row = grad_scores[..., keys_width].reshape(units.numel(), layout.group, BAND)
                grad_sinks.index_add_(0, heads.reshape(-1), per_row.sum(-1).reshape(-1))
            grad_scores = grad_scores[..., :keys_width]
            if slope is not None:
                grad_scores = grad_scores * slope
            keys = self.windows(self.k_chunks, units, blocks)
            rows_grad = (scale * grad_scores @ keys).view(units.numel(), layout.group, BAND, -1)
            by_row[2][tuple(i[real] for i in index)] = rows_grad[real]
            # The queries are scaled: dK = scale dS^T Q is dS^T times the scaled queries.
            at = (units.view(-1, 1), torch.where(positions >= 0, positions, layout.n_k))
            grad_k.index_put_(at, grad_scores.mT @ self.queries(units, blocks), accumulate=True)
            grad_v.index_put_(at, weights.mT @ unit_grad, accumulate=True)
            if grad_alpha is not None:
                per_row = grad_row_alpha.view(units.numel(), layout.group, BAND).sum(-1)
                grad_alpha.index_add_(0, heads.reshape(-1), per_row.reshape(-1))

    def rows_index(self, units: Tensor, blocks: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
        """Index (unit, group, row) of the pairs' query rows in a (B * Hkv, group, Nq, ...) view, each
        (P, group, BAND), and which of them are real rows (not past the last query)."""
        layout = self.layout
        row = blocks.view(-1, 1, 1) * BAND + torch.arange(BAND, device=blocks.device).view(1, 1, -1)
        row = row.expand(-1, layout.group, -1)
        group = torch.arange(layout.group, device=blocks.device).view(1, -1, 1).expand_as(row)
        real = row < layout.n_q
        return (units.view(-1, 1, 1).expand_as(row), group, row.clamp_max(layout.n_q - 1)), real


def _buckets(live: Tensor, candidates: Tensor, seed: slice) -> list[_Bucket]:
    """The units of a query block grouped by the keys they score.

    A unit whose live blocks lie before the seed and fill at least half of
    the span from the first of them to the seed scores that span as a tail:
    contiguous keys, no gathering (ALiBi heads keep the blocks next to the
    seed; a unit where every block is live scores every key). Tails are
    grouped by where they start, and the others by their count of live blocks
    rounded up to a power of two (padded with -1); a group joins the next
    wider one when the padding costs less than MERGE_SLACK of the block's work.
    """
    seed_block = seed.start // KEY_BLOCK
    before = candidates < seed_block
    counts = live.sum(-1)
    first_live = torch.where(live & before, candidates, seed_block).amin(-1)
    tails = ((counts == candidates.numel()) | ~(live & ~before).any(-1)) & (
        2 * counts >= seed_block - first_live
    )
    first_live = torch.where(counts == candidates.numel(), candidates[0], first_live)
    widths = torch.where(counts > 0, 2 ** torch.ceil(torch.log2(counts.clamp_min(1))), 0).long()
    widths = widths.clamp_max(candidates.numel())
    keys_before = torch.where(tails, (seed_block - first_live) * KEY_BLOCK, widths * KEY_BLOCK)
    work = MERGE_SLACK * float(keys_before.sum() + (seed.stop - seed.start) * live.shape[0])
    buckets = []
    # Tails from the shortest on; a group joins the next longer one when its padding is cheap.
    firsts = sorted(set(first_live[tails].tolist()), reverse=True)
    groups = _merged(
        firsts, lambda first: torch.nonzero(tails & (first_live == first)).view(-1).tolist(), work
    )
    for first, unit_list in groups:
        units = None if len(unit_list) == live.shape[0] else torch.tensor(unit_list, device=live.device)
        buckets.append(_Bucket(units, None, seed, first * KEY_BLOCK))
    widths_used = torch.unique(widths[~tails]).tolist()
    groups = _merged(
        widths_used, lambda width: torch.nonzero((widths == width) & ~tails).view(-1).tolist(), work
    )
    # Live blocks first, in key order (a stable sort of "not live").
    order = torch.sort((~live).to(torch.uint8), dim=-1, stable=True).indices
    for width, unit_list in groups:
        units = torch.tensor(unit_list, device=live.device)
        blocks = candidates[order[units, :width]]
        blocks = torch.where(torch.arange(width, device=live.device) < counts[units, None], blocks, -1)
        buckets.append(_Bucket(units, blocks, seed))
    return buckets


def _merged(keys: list[int], units_of, budget: float) -> list[tuple[int, list[int]]]:
    """Groups (key, units) in the order of ``keys`` (block counts or starts, cheapest first); a
    group joins the next when padding its units to the next key costs at most ``budget`` keys."""
    groups: list[tuple[int, list[int]]] = []
    for key in keys:
        units = units_of(key)
        if groups and len(groups[-1][1]) * abs(key - groups[-1][0]) * KEY_BLOCK <= budget:
            units = groups.pop()[1] + units
        groups.append((key, units))
    return groups


class _Plan(NamedTuple):
    """One query block: its rows, the keys its queries can see, and how its units score them."""

    start: int
    end: int
    keys: int
    buckets: list[_Bucket]


class BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, alpha_tensor, sinks, alpha_float, bias, scale, count_support):
        alpha = alpha_float if alpha_tensor is None else alpha_tensor.detach()
        layout = _Layout(q, k, alpha, bias, sinks)
        flat_k, flat_v = layout.flat(k), layout.flat(v)
        out = q.new_zeros(layout.batch, layout.heads, layout.n_q, v.shape[-1])
        m = q.new_zeros(layout.batch, layout.heads, layout.n_q, dtype=layout.work)
        s = torch.full_like(m, float("inf"))
        support = torch.zeros(m.shape, dtype=torch.long, device=q.device)
        query_blocks = -(-layout.n_q // layout.block)
        long_enough = layout.n_k >= MIN_BOUNDED_KEYS and query_blocks >= MIN_BOUNDED_QUERY_BLOCKS
        bounded = layout.prunes and long_enough
        bounds = _KeyBounds(flat_k) if bounded else None
        plans, scored, visible_blocks = [], 0, 0
        band_units = layout.band_units() if bounded else None
        band = None
        if band_units is not None:
            band = _Band(layout, layout.grouped_queries(q, scale), flat_k, flat_v)
            scored += band.run(band_units, bounds, out, m, s, support, count_support)
        # With a band, query blocks are whole band blocks: each band block lies in one query block.
        step = 1 if band is None else BAND
        unscored = torch.zeros(layout.units, device=q.device)
        start, block = 0, _rounded_up(layout.block, step)
        backoff, rest_before_bounds = 1, 0
        while start < layout.n_q:
            end = min(start + block, layout.n_q)
            keys = bias.key_end(end)
            plan = _Plan(start, end, keys, [])
            plans.append(plan)
            start = end
            if keys == 0:
                continue
            visible_blocks += -(-keys // KEY_BLOCK)
            remaining = None
            if band is not None:
                blocks = slice(plan.start // BAND, -(-end // BAND))
                in_band = band.done[:, blocks].all(-1)
                # A unit the band leaves any row of this block to scores the whole block here.
                band.done[:, blocks] &= in_band.view(-1, 1)
                if bool(in_band.any()):
                    unscored[in_band] += max(0, band.window_start(plan.start // BAND)) // KEY_BLOCK
                    remaining = torch.nonzero(~in_band).view(-1)
                    if remaining.numel() == 0:
                        continue
            q_rows = scale * layout.grouped(q, plan.start, end)
            seed = slice(bias.key_start(plan.start), keys)
            reach = seed.start
            if bounds is not None and rest_before_bounds == 0:
                seed, reach = layout.seed(plan.start, end, keys), layout.reach(plan.start)
            seed_scores = layout.scores(q_rows, flat_k, plan.start, end, seed, units=remaining)

            def seed_of(bucket: _Bucket, seed_scores=seed_scores, remaining=remaining) -> Tensor:
                """The seed scores of the bucket's units (``seed_scores`` holds those of ``remaining``)."""
                if bucket.units is remaining:
                    return seed_scores
                if remaining is None:
                    return seed_scores[bucket.units]
                local = torch.full((layout.units,), -1, dtype=torch.long, device=remaining.device)
                local[remaining] = torch.arange(remaining.numel(), device=remaining.device)
                return seed_scores[local[bucket.units]]

            live, candidates = None, None
            if seed.stop - seed.start < keys - reach:
                live, candidates = bounds.live(
                    layout, q_rows, seed_scores, plan.start, end, keys, seed, remaining
                )
            if live is None:
                plan.buckets.append(_Bucket(remaining, None, seed, reach))
                rest_before_bounds = max(0, rest_before_bounds - 1)
            elif bool(live.all()):
                # Nothing ruled out: try again after twice as many query blocks as last time, so
                # that bounds cost little where they never pay (Gaussian scores, dense heads).
                plan.buckets.append(_Bucket(remaining, None, seed, reach))
                backoff = 2 * backoff
                rest_before_bounds = backoff
            else:
                plan.buckets.extend(bucket.among(remaining) for bucket in _buckets(live, candidates, seed))
                backoff = 1
            entries = 0
            for bucket in plan.buckets:
                unscored[slice(None) if bucket.units is None else bucket.units] += bucket.unscored(keys)
                positions = None if bucket.units is None else bucket.positions(keys)
                if bucket.blocks is None:
                    scores = layout.scores_around(
                        bucket, q_rows, flat_k, seed_of(bucket), plan.start, end, keys
                    )
                else:
                    gathered = positions[:, : positions.shape[1] - (seed.stop - seed.start)]
                    bucket_k = bucket.keys_of(flat_k, keys, gathered)
                    own, _ = layout.bucket_scores(bucket, q_rows, bucket_k, gathered, plan.start, end)
                    scores = torch.cat([own, seed_of(bucket)], -1)
                width = scores.shape[-1]
                row_scores = layout.with_sinks(scores, plan.start, end, bucket.units)
                alpha_rows = layout.row_alpha(plan.start, end, bucket.units)
                weights, block_m, block_s = entmax_rows(
                    row_scores.view(-1, row_scores.shape[-1]), alpha_rows, layout.compiled
                )
                weights = weights.view(row_scores.shape)[..., :width]
                block_out = _times(weights, bucket.keys_of(flat_v, keys, positions))
                layout.per_unit(out, plan.start, end, bucket, block_out)
                layout.per_unit(m, plan.start, end, bucket, block_m)
                layout.per_unit(s, plan.start, end, bucket, block_s)
                if count_support:
                    layout.per_unit(support, plan.start, end, bucket, (weights > 0).sum(-1))
                entries += scores.shape[0] * width
            scored += entries * q_rows.shape[1]
            held = layout.units if remaining is None else remaining.numel()
            if entries < held * (keys - reach) or remaining is not None:
                # Blocks were ruled out or units left to the band: the next query block holds as
                # many score entries as the budget allows at this block's widths.
                grown = min(MAX_GROWN_QUERY_BLOCK, SCORE_BLOCK_BUDGET // (entries * layout.group))
                block = _rounded_up(max(layout.block, grown), step)
        ctx.save_for_backward(q, k, v, m, s, alpha_tensor, sinks)
        band_pairs = None if band is None else torch.nonzero(band.done)
        ctx.layout_args = (alpha, bias, scale, plans, band_pairs)
        skipped = torch.tensor(1 - scored / max(1, layout.batch * layout.heads * layout.n_q * layout.n_k))
        share = (unscored / max(1, visible_blocks)).view(layout.batch, layout.kv_heads, 1)
        share = share.expand(-1, -1, layout.group).reshape(layout.batch, layout.heads).mean(0)
        ctx.mark_non_differentiable(m, s, support, skipped, share)
        return out, m, s, support, skipped, share

    @staticmethod
    def backward(ctx, grad_out, *_):
        q, k, v, m, s, alpha_tensor, sinks = ctx.saved_tensors
        alpha, bias, scale, plans, band_pairs = ctx.layout_args
        layout = _Layout(q, k, alpha, bias, sinks)
        flat_k, flat_v = layout.flat(k), layout.flat(v)
        grad_q = torch.zeros(q.shape, dtype=layout.work, device=q.device)
        # One spare key row per unit takes the (zero) gradients of the padding positions.
        grad_k = torch.zeros(layout.units, layout.n_k + 1, k.shape[-1], dtype=layout.work, device=k.device)
        grad_v = torch.zeros(layout.units, layout.n_k + 1, v.shape[-1], dtype=layout.work, device=v.device)
        alpha_grad = alpha_tensor is not None and ctx.needs_input_grad[3]
        grad_alpha = torch.zeros(layout.heads, dtype=layout.work, device=q.device) if alpha_grad else None
        sink_grad = sinks is not None and ctx.needs_input_grad[4]
        grad_sinks = torch.zeros(layout.heads, dtype=layout.work, device=q.device) if sink_grad else None
        if band_pairs is not None and band_pairs.numel():
            band = _Band(layout, layout.grouped_queries(q, scale), flat_k, flat_v)
            band.backward(
                band_pairs,
                grad_out,
                m,
                s,
                scale,
                (grad_q, grad_k, grad_v, grad_alpha, grad_sinks),
                alpha_grad,
            )
        for start, end, keys, buckets in plans:
            q_rows = layout.grouped(q, start, end)
            grad_rows = layout.grouped(grad_out, start, end)
            for bucket in buckets:
                positions = None if bucket.units is None else bucket.positions(keys)
                bucket_k = bucket.keys_of(flat_k, keys, positions)
                bucket_v = bucket.keys_of(flat_v, keys, positions)
                scores, slope = layout.bucket_scores(bucket, scale * q_rows, bucket_k, positions, start, end)
                keys_width = scores.shape[-1]
                scores = layout.with_sinks(scores, start, end, bucket.units)
                width = scores.shape[-1]
                row_alpha = layout.row_alpha(start, end, bucket.units)
                block_m = layout.unit_rows(m, start, end, bucket)
                block_s = layout.unit_rows(s, start, end, bucket)
                weights = entmax_rows_from_threshold(
                    scores.view(-1, width), block_m, block_s, row_alpha, layout.compiled
                )
                del scores
                unit_q, unit_grad = bucket.rows_of(q_rows), bucket.rows_of(grad_rows)
                grad_weights = _times(unit_grad, bucket_v, transpose=True)
                # The sink carries no value: its weight's gradient is zero, yet it joins the Jacobian.
                grad_weights = torch.nn.functional.pad(grad_weights, (0, width - keys_width)).view(-1, width)
                grad_scores, grad_row_alpha = entmax_rows_backward(
                    weights, grad_weights, row_alpha, alpha_grad, layout.compiled
                )
                grad_scores = grad_scores.view(-1, q_rows.shape[1], width)
                weights = weights.view(grad_scores.shape)[..., :keys_width]
                if grad_sinks is not None:
                    heads = layout.unit_heads if bucket.units is None else layout.unit_heads[bucket.units]
                    per_row = grad_scores[..., keys_width].reshape(heads.shape[0], layout.group, -1)
                    grad_sinks.index_add_(0, heads.reshape(-1), per_row.sum(-1).reshape(-1))
                grad_scores = grad_scores[..., :keys_width]
                if slope is not None:
                    grad_scores = grad_scores * slope
                grad_scores = grad_scores * scale
                layout.per_unit(grad_q, start, end, bucket, _times(grad_scores, bucket_k))
                bucket.accumulate(grad_k, keys, positions, grad_scores, unit_q)
                bucket.accumulate(grad_v, keys, positions, weights, unit_grad)
                if grad_alpha is not None:
                    per_head = torch.zeros(layout.units, layout.group, dtype=layout.work, device=q.device)
                    per_head[slice(None) if bucket.units is None else bucket.units] = grad_row_alpha.view(
                        -1, layout.group, end - start
                    ).sum(-1)
                    grad_alpha += per_head.view(layout.batch, layout.heads).sum(0)
        grad_k = grad_k[:, : layout.n_k].reshape(k.shape)
        grad_v = grad_v[:, : layout.n_k].reshape(v.shape)
        return (
            grad_q.to(q.dtype),
            grad_k.to(k.dtype),
            grad_v.to(v.dtype),
            None if grad_alpha is None else grad_alpha.to(alpha_tensor.dtype),
            None if grad_sinks is None else grad_sinks.to(sinks.dtype),
            None,
            None,
            None,
            None,
        )


def blocked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float | Tensor,
    bias: ScoreBias,
    scale: float,
    stats: bool,
    sinks: Tensor | None = None,
) -> tuple[Tensor, AttentionStats | None]:
    """alpha-entmax attention without materialising (Nq, Nk); alpha float or (H,); sinks (H,) or None."""
    alpha_tensor = alpha if isinstance(alpha, Tensor) else None
    alpha_float = alpha if isinstance(alpha, float) else None
    out, m, s, support, skipped, unscored = BlockedAttention.apply(
        q, k, v, alpha_tensor, sinks, alpha_float, bias, scale, stats
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
    return out, AttentionStats(
        tau=tau, support=support, skipped_fraction=float(skipped), unscored_key_blocks=unscored
    )


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
            for start, end, first, keys in layout.blocks():
                if keys > first:
                    block = _row_map_block(
                        layout, q, k, v, function, options, names, parameters, scale, start, end, first, keys
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
        for start, end, first, keys in layout.blocks():
            if keys <= first:
                continue
            with torch.enable_grad():
                block = _row_map_block(
                    layout, *leaves[:3], function, options, names, leaves[3:], scale, start, end, first, keys
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


def _row_map_block(layout, q, k, v, function, options, names, parameters, scale, start, end, first, keys):
    """Output rows start:end (B, H, rows, Dv) in the compute dtype, from the keys first:keys."""
    q_rows = layout.grouped(q, start, end)
    scores = layout.scores(scale * q_rows, layout.flat(k), start, end, slice(first, keys))
    scores = scores.view(layout.batch, layout.heads, end - start, keys - first)
    weights = function(scores, **dict(zip(names, parameters, strict=True)), **options)
    values = v[:, :, first:keys].to(layout.work)
    grouped = weights.view(layout.batch, layout.kv_heads, -1, keys - first) @ values
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
