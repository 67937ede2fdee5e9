"""A paged KV cache and certified sparse decoding: read only the pages that can hold weight.

The cache keeps each (batch row, KV head)'s keys in pages of ``page_size``
tokens, with the elementwise minimum and maximum of every page's keys and two
sketches of them: int8 and 4-bit codes with one scale per page. For a query q,
sum_d max(q_d min_d, q_d max_d) bounds q.k over a page from above (plus the
page's best ALiBi bias) without reading its keys; so does each sketch, from
exact integer products of its codes with the query's (docs/mathematics.md,
section 6), reading an eighth or a sixteenth of the fp32 key bytes.

Decoding is exact by a certificate (docs/mathematics.md, section 1): the
threshold tau of any subset of a row's keys is a lower bound on the row's
tau, and a key with (alpha-1) score <= tau has weight zero. ``decode`` reads
the pages with the highest bounds first (a first group), takes the threshold
of what it read, and then reads every page whose bound could still beat it;
the pages left unread provably hold only zero weights, so the result equals
dense attention over the whole cache. For softmax (alpha = 1) no key is
provably zero and every page is read. ``max_dropped_mass=eps`` stops earlier,
once the weight the unread pages could take is provably at most eps. For a KV
head whose query rows would gather a large share of its pages, one dense pass
over them costs less, and ``decode`` runs that (exactly) for that head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor

from ..normalize import entmax
from .api import _check_alpha, _check_scale, _check_sinks, _check_softcap, _check_window, attention
from .masks import KeyPadding, soft_capped
from .sketch_kernels import (
    CODE_LIMIT,
    MAX_HEAD_DIM,
    NIBBLE_BLOCK,
    NIBBLE_LIMIT,
    NIBBLE_QUERY_LEVELS,
    QUERY_LEVELS,
    calibration,
    nibble_dim,
    pack_nibbles,
    page_max_dots,
    page_max_nibble_dots,
)
from .stats import thresholds_of

FIRST_GROUP_PAGES = 8
"""Pages read before the first threshold: enough to hold the support of a sharp row."""

DENSE_BELOW = 65536
"""decode's default: below this many keys in every row, planning can cost more than dense attention.
Measured on a 2-core AVX2 CPU (`sparsa bench decode`): a Gaussian cache with 4 rows took 2.5x the
dense decode at 32k keys and 1.45x at 48k, 0.97x-1.07x at 64k; sharp caches gain from 32k on."""

DENSE_SHARE = 0.2
"""A KV head whose rows would gather more than this share of its pages (summed over rows) reads densely."""

REFINEMENTS = 2
"""Rounds that read 4x more of the best pages to raise the threshold before the final read."""

SKETCH_OPEN_SHARE = 0.15
"""Sketch a KV head whose page bounds leave more than this share of its pages open (see below)."""

FLAT_SUPPORT = 0.9
"""A row whose first pages have this share of their keys in the support is taken to be dense."""

SUMMARY_PAGES = 1024
"""Pages summarised at once on append: bounds the temporary memory of a long prefill."""

BOUND_MARGIN = 1e-5
"""Relative slack on bounds and thresholds, so that rounding can never certify a key that has weight."""


class PagedKVCache:
    """Keys and values of one attention layer in pages of ``page_size`` tokens per (batch row, KV head).

    Each batch row holds its own number of tokens (``lengths``), stored from
    page 0 on without padding. ``append`` adds a chunk of tokens, one or many,
    to every row (with a :class:`KeyPadding` saying which tokens of the chunk
    are real for each row) and updates the per-page summaries that bound the
    scores: key minima and maxima, and the int8 and 4-bit key sketches. Storage
    grows by doubling.
    """

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        *,
        value_dim: int | None = None,
        page_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            _check_count(name, value)
        _check_count("page_size", page_size)
        value_dim = head_dim if value_dim is None else value_dim
        _check_count("value_dim", value_dim)
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.page_size = page_size
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.keys = torch.empty(batch, kv_heads, 0, page_size, head_dim, dtype=dtype, device=device)
        self.values = torch.empty(batch, kv_heads, 0, page_size, value_dim, dtype=dtype, device=device)
        self.key_extremes = torch.empty(batch, kv_heads, 0, 2, head_dim, dtype=torch.float32, device=device)
        """Each page's elementwise key maxima ([..., 0, :]) and minima ([..., 1, :]), side by side so that
        one matrix product bounds the scores."""
        self.key_codes = torch.empty(batch, kv_heads, 0, page_size, head_dim, dtype=torch.int8, device=device)
        self.key_scale = torch.empty(batch, kv_heads, 0, dtype=torch.float32, device=device)
        self.key_code_norm = torch.empty(batch, kv_heads, 0, page_size, dtype=torch.int16, device=device)
        """The int8 sketch: k = key_scale * key_codes + e with |e_d| <= key_scale / 2, one scale per
        page; key_code_norm is sum_d |key_codes_d| of each key (it bounds the error of an int8 query)."""
        nibble_width = nibble_dim(head_dim) // 2
        self.key_nibbles = torch.empty(
            batch, kv_heads, 0, page_size, nibble_width, dtype=torch.uint8, device=device
        )
        self.key_nibble_scale = torch.empty(batch, kv_heads, 0, dtype=torch.float32, device=device)
        self.key_nibble_norm = torch.empty(batch, kv_heads, 0, dtype=torch.int16, device=device)
        """The coarse sketch, the same with 4-bit codes in [-7, 7] (packed by
        ``sketch_kernels.pack_nibbles``); key_nibble_norm is the largest sum_d |c_d| of each page."""

    @classmethod
    def like(cls, k: Tensor, v: Tensor, page_size: int = 16) -> PagedKVCache:
        """An empty cache for chunks shaped, typed and placed like k (B, Hkv, T, D) and v (B, Hkv, T, Dv)."""
        batch, kv_heads, _, dim = k.shape
        return cls(
            batch, kv_heads, dim, value_dim=v.shape[-1], page_size=page_size, dtype=k.dtype, device=k.device
        )

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[4]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def value_dim(self) -> int:
        return self.values.shape[4]

    @property
    def page_capacity(self) -> int:
        return self.keys.shape[2]

    def append(self, k: Tensor, v: Tensor, padding: KeyPadding | None = None) -> None:
        """Add k (B, Hkv, T, D) and v (B, Hkv, T, Dv) after each row's cached tokens.

        ``padding`` says how many of the T tokens are real in each row and on
        which side of the chunk the padding is; without it all T are real.
        """
        self._check_chunk(k, v)
        chunk = k.shape[2]
        counts = (
            torch.full_like(self.lengths, chunk) if padding is None else self._check_padding(padding, chunk)
        )
        ends = self.lengths + counts
        self._reserve(int(ends.max()) if ends.numel() else 0)
        flat_keys = self.keys.view(self.batch, self.kv_heads, -1, self.head_dim)
        flat_values = self.values.view(self.batch, self.kv_heads, -1, self.value_dim)
        for row in range(self.batch):
            count, start = int(counts[row]), int(self.lengths[row])
            if count == 0:
                continue
            first = chunk - count if padding is not None and padding.side == "left" else 0
            flat_keys[row, :, start : start + count] = k[row, :, first : first + count]
            flat_values[row, :, start : start + count] = v[row, :, first : first + count]
            self._summarise(
                row, start // self.page_size, (start + count - 1) // self.page_size + 1, start + count
            )
        self.lengths = ends

    def pages(self, row: int | None = None) -> Tensor | int:
        """Pages in use per row (B,), or of one row."""
        used = (self.lengths + self.page_size - 1) // self.page_size
        return used if row is None else int(used[row])

    def dense(self, row: int) -> tuple[Tensor, Tensor]:
        """Keys (1, Hkv, N, D) and values (1, Hkv, N, Dv) of one row, as views of the pages."""
        length = int(self.lengths[row])
        keys = self.keys[row : row + 1].reshape(1, self.kv_heads, -1, self.head_dim)[:, :, :length]
        values = self.values[row : row + 1].reshape(1, self.kv_heads, -1, self.value_dim)
        return keys, values[:, :, :length]

    def _summarise(self, row: int, first_page: int, end_page: int, length: int) -> None:
        """Key minima and maxima of pages first_page..end_page of ``row`` (the last may be part-filled)."""
        for start in range(first_page, end_page, SUMMARY_PAGES):
            end = min(end_page, start + SUMMARY_PAGES)
            pages = self.keys[row, :, start:end].float()
            slots = torch.arange(start * self.page_size, end * self.page_size, device=self.device)
            filled = (slots < length).view(1, end - start, self.page_size, 1)
            low = pages.masked_fill(~filled, math.inf).amin(2)
            high = pages.masked_fill(~filled, -math.inf).amax(2)
            self.key_extremes[row, :, start:end] = torch.stack([high, low], 2)
            scale = torch.maximum(high, -low).amax(-1) / CODE_LIMIT
            codes = torch.round(pages.masked_fill(~filled, 0.0) / scale.clamp_min(1e-30)[..., None, None])
            codes = codes.clamp(-CODE_LIMIT, CODE_LIMIT)
            self.key_codes[row, :, start:end] = codes.to(torch.int8)
            self.key_code_norm[row, :, start:end] = codes.abs().sum(-1).to(torch.int16)
            self.key_scale[row, :, start:end] = scale
            nibble_scale = torch.maximum(high, -low).amax(-1) / NIBBLE_LIMIT
            nibbles = torch.round(
                pages.masked_fill(~filled, 0.0) / nibble_scale.clamp_min(1e-30)[..., None, None]
            )
            nibbles = nibbles.clamp(-NIBBLE_LIMIT, NIBBLE_LIMIT)
            self.key_nibbles[row, :, start:end] = pack_nibbles(nibbles)
            self.key_nibble_norm[row, :, start:end] = nibbles.abs().sum(-1).amax(-1).to(torch.int16)
            self.key_nibble_scale[row, :, start:end] = nibble_scale

    def _reserve(self, tokens: int) -> None:
        needed = -(-tokens // self.page_size)
        if needed <= self.page_capacity:
            return
        size = max(needed, 2 * self.page_capacity)
        for name in (
            "keys", "values", "key_extremes", "key_codes", "key_scale", "key_code_norm",
            "key_nibbles", "key_nibble_scale", "key_nibble_norm",
        ):  # fmt: skip
            old = getattr(self, name)
            # Zeros, not garbage: weight-zero slots of a gathered page must not bring NaN into p @ V.
            grown = old.new_zeros(old.shape[0], old.shape[1], size, *old.shape[3:])
            grown[:, :, : old.shape[2]] = old
            setattr(self, name, grown)

    def _check_chunk(self, k: Tensor, v: Tensor) -> None:
        for name, x, width in (("k", k, self.head_dim), ("v", v, self.value_dim)):
            if not isinstance(x, Tensor) or x.dim() != 4:
                raise ValueError(f"{name} must be a tensor (batch, kv_heads, tokens, dim)")
            if x.shape[0] != self.batch or x.shape[1] != self.kv_heads or x.shape[3] != width:
                expected = f"({self.batch}, {self.kv_heads}, T, {width})"
                raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")
            if x.dtype != self.dtype or x.device != self.device:
                raise ValueError(
                    f"{name} is {x.dtype} on {x.device}; the cache holds {self.dtype} on {self.device}"
                )
        if k.shape[2] != v.shape[2]:
            raise ValueError(
                f"k and v must hold the same number of tokens, got {k.shape[2]} and {v.shape[2]}"
            )

    def _check_padding(self, padding: KeyPadding, chunk: int) -> Tensor:
        if not isinstance(padding, KeyPadding):
            raise TypeError(f"padding must be a KeyPadding, got {type(padding).__name__}")
        counts = padding.lengths.to(self.device, torch.long)
        if counts.shape != (self.batch,) or bool(((counts < 0) | (counts > chunk)).any()):
            raise ValueError(f"padding.lengths must be ({self.batch},) counts in [0, {chunk}]")
        return counts


@dataclass
class DecodeStats:
    """What one ``decode`` call read, per query row (B, H, Nq) unless said otherwise.

    pages_read / keys_read: pages and real keys whose keys were read;
    pages_visible: pages the row could see; candidate_pages: pages whose bound
    beat the final threshold lower bound (a page holding support is always one);
    support / support_pages: keys with nonzero weight and the pages holding
    them; dropped_mass_bound: a proven upper bound on the weight of the keys
    left unread (0 when exact); bytes_read: keys and values read over the
    whole call, with the summaries the bounds read (a page gathered for several query rows counts
    once per row; a KV head decoded densely counts its keys once, and its page minima and maxima
    and each sketch of it count once); dense: the rows
    decoded by the dense path (their support_pages is -1), for the KV heads where gathering
    pages would cost more than reading them all; sketched: the rows whose bounds the int8 key
    sketch tightened; sketch_kernel: the kernel that gave the sketch's exact page maxima (chosen by
    measurement, see ``sparsa.attention.sketch_kernels``), None when no row was sketched;
    coarse_sketched and coarse_sketch_kernel: the same for the 4-bit sketch, which bounds the content
    heads (those without ALiBi) first.
    """

    pages_read: Tensor
    keys_read: Tensor
    pages_visible: Tensor
    candidate_pages: Tensor
    support: Tensor
    support_pages: Tensor
    dropped_mass_bound: Tensor
    bytes_read: int
    dense: Tensor
    sketched: Tensor
    sketch_kernel: str | None
    coarse_sketched: Tensor
    coarse_sketch_kernel: str | None


def decode(
    q: Tensor,
    cache: PagedKVCache,
    *,
    alpha: float | Tensor = 1.5,
    scale: float | None = None,
    alibi_slopes: Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    max_dropped_mass: float = 0.0,
    dense_below: int = DENSE_BELOW,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, DecodeStats]:
    """alpha-entmax attention of q over the cache, reading only the pages that can hold weight.

    Args:
        q: (B, H, Nq, D), H a multiple of the cache's KV heads. The Nq queries
            of row b sit at the end of its keys: query i at position
            lengths[b] - Nq + i, seeing keys 0 .. lengths[b] - Nq + i (queries
            before a row's first key see none and give zeros).
        alpha: >= 1, a float or a tensor (H,) with one alpha per head.
        scale: multiplies q.k; default 1/sqrt(D).
        alibi_slopes: (H,) or (B, H), non-negative; adds slope * (key_pos - query_pos).
        window: each query sees at most its ``window`` most recent keys (a
            sliding window); pages wholly before it are never read.
        softcap: as in :func:`sparsa.attention`; the cap is applied to the
            page bounds too (it is increasing, so they stay bounds).
        sinks: as in :func:`sparsa.attention`; each row's sink joins the
            threshold of every subset of keys read.
        max_dropped_mass: 0 (default) is exact: the same as
            ``sparsa.attention(q, K, V, alpha=alpha, is_causal=True, window=window,
            softcap=softcap, sinks=sinks, attn_mask=KeyPadding(lengths, "left"),
            alibi_slopes=...)`` over the
            left-padded cache. eps > 0 stops reading once the weight that all
            unread keys could still take is at most eps (reported per row).
        dense_below: a cache whose rows all hold fewer keys than this is decoded
            densely without bounds (the bounds and gathers cost more than they
            save there); 0 plans at every length.
        return_stats: also return :class:`DecodeStats`.

    Non-finite queries and keys give what ``sparsa.attention`` gives: a page
    holding a NaN or infinite key has no finite bound and is always read.

    Example:
        >>> import torch, sparsa
        >>> from sparsa.attention import PagedKVCache, decode
        >>> q, k, v = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 500, 32), torch.randn(1, 2, 500, 32)
        >>> cache = PagedKVCache(1, 2, 32, page_size=16)
        >>> cache.append(k, v)
        >>> out = decode(q, cache, alpha=1.5)  # the query after the 500 cached tokens
        >>> dense = sparsa.attention(q, k, v, alpha=1.5, is_causal=True)
        >>> torch.allclose(out, dense, atol=1e-5)
        True
    """
    heads = _check_query(q, cache)
    alpha_heads = _alpha_per_head(alpha, heads, q.device)
    scale = 1 / math.sqrt(q.shape[3]) if scale is None else _check_scale(scale)
    if isinstance(max_dropped_mass, bool) or not isinstance(max_dropped_mass, Real):
        raise TypeError(f"max_dropped_mass must be a number, got {type(max_dropped_mass).__name__}")
    if not 0 <= max_dropped_mass < 1:
        raise ValueError(f"max_dropped_mass must lie in [0, 1), got {max_dropped_mass}")
    slopes = _check_slopes(alibi_slopes, q.shape[0], heads, q.device)
    if isinstance(dense_below, bool) or not isinstance(dense_below, int) or dense_below < 0:
        raise ValueError(f"dense_below must be an integer >= 0, got {dense_below!r}")
    _check_window(window, True)
    _check_softcap(softcap)
    _check_sinks(sinks, heads, q.device)
    rows = _Rows(q, cache, alpha_heads, slopes, scale, window, softcap, sinks)
    out, stats = rows.decode(float(max_dropped_mass), dense_below, alpha, alibi_slopes, return_stats)
    return (out, stats) if return_stats else out


class _Rows:
    """The query rows of one decode call, flattened to (R = B * H * Nq,), with their page bounds."""

    def __init__(
        self,
        q: Tensor,
        cache: PagedKVCache,
        alpha: Tensor,
        slopes: Tensor,
        scale: float,
        window: int | None,
        softcap: float | None,
        sinks: Tensor | None,
    ) -> None:
        batch, heads, n_q, dim = q.shape
        self.q, self.cache, self.scale = q, cache, scale
        self.shape = (batch, heads, n_q)
        device = q.device
        self.b = torch.arange(batch, device=device).repeat_interleave(heads * n_q)
        self.h = torch.arange(heads, device=device).repeat_interleave(n_q).repeat(batch)
        self.g = self.h // (heads // cache.kv_heads)
        i = torch.arange(n_q, device=device).repeat(batch * heads)
        self.position = cache.lengths[self.b] - n_q + i
        self.alpha = alpha[self.h]
        self.slope = slopes[self.b, self.h]
        self.alibi = bool((self.slope != 0).any())
        self.query = q.reshape(-1, dim).float()
        self.window = None if window is None else int(window)
        self.softcap = None if softcap is None else float(softcap)
        self.sinks = sinks
        self.sink = None if sinks is None else sinks.detach().float()[self.h]
        # The first key each row sees: its window's, or the first of all.
        self.first_key = torch.zeros_like(self.position) if window is None else (self.position - window + 1)
        self.first_key = self.first_key.clamp_min(0)
        end_page = torch.where(
            self.position >= 0, self.position.div(cache.page_size, rounding_mode="floor") + 1, 0
        )
        self.first_page = torch.minimum(self.first_key.div(cache.page_size, rounding_mode="floor"), end_page)
        self.end_page = end_page
        self.visible_pages = end_page - self.first_page

    def _page_bounds(self, groups: Tensor) -> Tensor:
        """(R, pages): an upper bound on the score of every key of each page the row sees (-inf: none),
        from the page minima and maxima for the rows of ``groups`` (B, Hkv); +inf on the pages the
        other rows see (the sketch bounds them, see ``plan``).

        max_d(q_d min_d, q_d max_d) summed over d is relu(q) . max - relu(-q) . min: one matrix
        product per KV head over the page summaries, for the query heads of its group together.
        """
        cache = self.cache
        pages = max(1, int(self.end_page.max()))
        # Pages before every row's window are never read, their summaries included.
        first = min(int(self.first_page.min()), pages - 1)
        bounds = torch.full((len(self.position), pages), math.inf, device=self.query.device)
        page = torch.arange(pages, device=bounds.device)
        if bool(groups.any()):
            batch_rows, kv_heads = groups.nonzero().unbind(1)
            q = self.query.view(*self._groups, -1)[batch_rows, kv_heads]
            signed = torch.cat([q.clamp_min(0), q.clamp_max(0)], -1)
            dot = q.new_empty(*q.shape[:2], pages - first)
            for i, (row, kv_head) in enumerate(zip(batch_rows.tolist(), kv_heads.tolist(), strict=True)):
                # Keys-major (pages x 2D times 2D x queries): twice as fast here as the queries-major one.
                extremes = cache.key_extremes[row, kv_head, first:pages].flatten(1)
                dot[i] = (extremes @ signed[i].T).T
            # Rounding slack: |q . k| <= ||q||_1 max|k_d|, and a dot product errs by a small multiple of
            # it; max|k_d| over the pages is their largest sketch scale times CODE_LIMIT.
            largest_key = cache.key_scale[batch_rows, kv_heads, first:pages].amax(-1) * CODE_LIMIT
            size = q.abs().sum(-1, keepdim=True) * largest_key[:, None, None]
            # In place: each pass over the (rows x pages) bounds costs about as much as the product.
            content = dot.add_(size, alpha=BOUND_MARGIN).view(-1, pages - first).mul_(self.scale)
            index = self._rows_of(groups).nonzero()[:, 0]
            bound = self._with_page_bias(soft_capped(content, self.softcap), page[first:], index)
            bounds[index, first:] = _unbounded_where_nan_(bound)
        if bool((self.end_page < pages).any() or (self.first_page > 0).any()):
            unseen = (page >= self.end_page[:, None]) | (page < self.first_page[:, None])
            bounds.masked_fill_(unseen, -math.inf)
        return bounds

    def _with_page_bias(self, bound: Tensor, page: Tensor, rows: Tensor | None = None) -> Tensor:
        """bound (R, pages), or (len(rows), pages) for the rows ``rows``, plus the largest ALiBi bias of
        each of the pages ``page``, at its last key the row sees (without ALiBi: bound, unchanged)."""
        if not self.alibi:
            return bound
        position, slope = (
            (self.position, self.slope) if rows is None else (self.position[rows], self.slope[rows])
        )
        last_key = torch.minimum((page + 1) * self.cache.page_size - 1, position[:, None])
        return bound + slope[:, None] * (last_key - position[:, None])

    def _scores(self, pages: Tensor, count: Tensor) -> Tensor:
        """Scores (R, W * P) of the pages (R, W) each row reads; only the first ``count`` of a row count."""
        cache = self.cache
        taken = torch.arange(pages.shape[1], device=pages.device) < count[:, None]
        keys = self._pages_of(cache.keys, pages)
        scores = torch.bmm(keys.flatten(1, 2).float(), self.query[:, :, None]).squeeze(-1) * self.scale
        scores = soft_capped(scores, self.softcap)
        slot = pages[:, :, None] * cache.page_size + torch.arange(cache.page_size, device=pages.device)
        slot = slot.flatten(1)
        scores = scores + self.slope[:, None] * (slot - self.position[:, None])
        visible = (slot <= self.position[:, None]) & (slot >= self.first_key[:, None])
        visible &= taken.repeat_interleave(cache.page_size, 1)
        return scores.masked_fill(~visible, -math.inf)

    def _pages_of(self, store: Tensor, pages: Tensor) -> Tensor:
        """The pages (R, W) of each row's KV head in ``store`` (B, Hkv, capacity, page_size, X), as
        (R, W, page_size, X): one index_select of whole pages, 1.6x faster here than advanced indexing."""
        batch, kv_heads, capacity = store.shape[:3]
        index = ((self.b * kv_heads + self.g)[:, None] * capacity + pages).view(-1)
        gathered = store.view(batch * kv_heads * capacity, -1).index_select(0, index)
        return gathered.view(*pages.shape, *store.shape[3:])

    def _threshold_of_best(self, width: int = FIRST_GROUP_PAGES) -> tuple[Tensor, Tensor]:
        """A lower bound on each row's tau from its ``width`` best pages by bound; the share of their keys
        in that subset's support."""
        _, pages = self._best_pages(int(torch.clamp(self.visible_pages, max=width).max()))
        return self._threshold_of(pages, width)

    def _threshold_of_newest(self) -> tuple[Tensor, Tensor]:
        """As ``_threshold_of_best`` for the FIRST_GROUP_PAGES newest pages of each row: no bounds needed."""
        newest = self.end_page[:, None] - 1 - torch.arange(FIRST_GROUP_PAGES, device=self.end_page.device)
        return self._threshold_of(torch.maximum(newest, self.first_page[:, None]), FIRST_GROUP_PAGES)

    def _threshold_of(self, pages: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """tau's lower bound and the support share of the first min(visible, width) of ``pages`` (R, W)."""
        scores = self._scores(pages, torch.clamp(self.visible_pages, max=width))
        # The sink is in every row: the threshold of a subset with it bounds the row's from below.
        joined = self._with_sink(scores)
        weights = _weights(joined, self.alpha)
        tau = thresholds_of(joined, weights, self.alpha[:, None])
        weights = weights[:, : scores.shape[1]]
        held = (weights > 0).sum(-1) / torch.isfinite(scores).sum(-1).clamp_min(1)
        # A NaN among the scores read gives a NaN tau, which proves nothing: no page is ruled out.
        tau = (tau - BOUND_MARGIN * (1 + tau.abs())).nan_to_num(nan=-math.inf)
        return tau, held

    def _with_sink(self, scores: Tensor) -> Tensor:
        """Scores (R, W) with each row's sink logit as one more column (the last), if there are sinks."""
        return scores if self.sink is None else torch.cat([scores, self.sink[:, None]], 1)

    def _candidates(self, tau: Tensor) -> Tensor:
        """Pages whose bound could beat tau, per row (for softmax rows: every visible page)."""
        alpha = self.alpha[:, None]
        beats = (alpha - 1) * self.bounds > tau[:, None]
        if bool((alpha == 1).any()):
            beats = torch.where(alpha == 1, self.bounds > -math.inf, beats)
        return beats.sum(-1)

    def _sketchable(self, first_support: Tensor) -> Tensor:
        """(B, Hkv): the KV heads whose rows the sketch can help, given the support share of a first subset.

        Not softmax rows (no key is provably zero), and not heads with a row whose first pages are
        nearly all in the support (a flat row: the sketch would rule out little). The first pages can
        miss a row's best keys, so only a nearly flat subset says the row is dense.
        """
        sparse_rows = ((self.alpha > 1) & (first_support < FLAT_SUPPORT)).view(self._groups).all(-1)
        return sparse_rows & (self.cache.head_dim <= MAX_HEAD_DIM)

    def _content_heads(self) -> Tensor:
        """(B, Hkv): KV heads none of whose rows has an ALiBi slope."""
        return (self.slope == 0).view(self._groups).all(-1)

    def _sketch_where_it_can_pay(self, first_support: Tensor, done: Tensor) -> Tensor:
        """The KV heads, not int8-sketched yet (``done``), that the bounds so far leave open, sketched.

        The sketch costs D + 2 bytes per key; reading a candidate page exactly costs its keys and
        values, so the sketch pays once more than SKETCH_OPEN_SHARE of a head's pages are open.
        """
        open_share = (self.candidates / self.visible_pages.clamp_min(1)).view(self._groups).amax(-1)
        worth = (open_share > SKETCH_OPEN_SHARE) & self._sketchable(first_support) & ~done
        self._tighten_with_sketch(worth)
        return worth

    def _tighten_with_sketch(self, groups: Tensor, coarse: bool = False) -> None:
        """The bounds of the rows of ``groups`` (B, Hkv), in place: the smaller of theirs and the sketch's
        (the 4-bit sketch's if ``coarse``)."""
        if bool(groups.all()):
            sketch = self._sketch_bounds(groups, None, coarse)
            self.bounds = torch.minimum(self.bounds, sketch, out=self.bounds)
        elif bool(groups.any()):
            index = self._rows_of(groups).nonzero()[:, 0]
            self.bounds[index] = torch.minimum(self.bounds[index], self._sketch_bounds(groups, index, coarse))

    def _sketch_bounds(self, groups: Tensor, rows: Tensor | None, coarse: bool = False) -> Tensor:
        """Page bounds (len(rows), pages) from the int8 sketch (the 4-bit one if ``coarse``) for the rows
        ``rows`` of ``groups`` (B, Hkv) (None: every group, every row).

        With k = s c + e (|e_d| <= s / 2, s the page's scale) and the query q = t u + f in integer
        codes u (|f_d| <= t / 2, t = max|q| / levels: int16 codes for the int8 sketch, int8 codes for
        the 4-bit one): q . c <= t (u . c + ||c||_1 / 2) and q . k <= s (q . c + ||q||_1 / 2). The
        page maxima of u . c are exact integers (``sketch_kernels``), one call per KV head; the rest
        is one fp32 pass.
        """
        cache, pages = self.cache, self.bounds.shape[1]
        batch_rows, kv_heads = groups.nonzero().unbind(1)
        queries = self.query.view(*self._groups, -1)[batch_rows, kv_heads]
        first_pages = self.first_page.view(self._groups).amin(-1)[batch_rows, kv_heads].tolist()
        shape = (*queries.shape[:2], pages)
        largest = torch.full(shape, torch.iinfo(torch.int32).max, dtype=torch.int32, device=queries.device)
        levels = NIBBLE_QUERY_LEVELS if coarse else QUERY_LEVELS
        step = queries.abs().amax(-1, keepdim=True).clamp_min(1e-30) / levels
        query_codes = torch.round(queries / step).clamp(-levels, levels)
        if coarse:
            padding = (0, nibble_dim(cache.head_dim) - cache.head_dim)
            query_codes = torch.nn.functional.pad(query_codes, padding).to(torch.int8)
            store, product = cache.key_nibbles, page_max_nibble_dots
        else:
            query_codes = query_codes.to(torch.int16)
            store, product = cache.key_codes, page_max_dots
        for i, (row, kv_head) in enumerate(zip(batch_rows.tolist(), kv_heads.tolist(), strict=True)):
            # The pages before the group's windows stay unread (their bound is -inf already).
            first = min(first_pages[i], pages - 1)
            codes = store[row, kv_head, first:pages].view(-1, store.shape[-1])
            largest[i, :, first:] = product(codes, query_codes[i], cache.page_size)
        # q / t is rounded to fp32 (half an ulp at 32385 levels is 2^-10) before its rounding to an
        # integer, so |f_d| <= t (1/2 + 2^-10); the fp32 arithmetic below errs by less than 1e-4 s ||q||_1
        # (|u . c| <= 127 ||u||_1, D <= 512). The 1e-3 beyond each half covers both.
        half = 0.5 + 1e-3
        if coarse:
            norms, scale = cache.key_nibble_norm, cache.key_nibble_scale
        else:
            norms, scale = cache.key_code_norm.amax(-1), cache.key_scale
        norms = norms[batch_rows, kv_heads, :pages].float()[:, None]
        scale = scale[batch_rows, kv_heads, :pages][:, None]
        bounds = largest.float().add_(norms, alpha=half).mul_(step)
        bounds.add_(queries.abs().sum(-1, keepdim=True), alpha=half).mul_(scale)
        # An infinite or NaN key gives its page no finite scale: the page bounds nothing and is read.
        bounds.masked_fill_(~torch.isfinite(scale), math.inf)
        page = torch.arange(pages, device=bounds.device)
        content = soft_capped(bounds.view(-1, pages).mul_(self.scale), self.softcap)
        return _unbounded_where_nan_(self._with_page_bias(content, page, rows))

    def _best_pages(self, width: int) -> tuple[Tensor, Tensor]:
        """Each row's ``width`` pages of highest bound, best first: bounds and page indices (R, width)."""
        # topk over the pages newest first: ALiBi bounds rise towards the newest pages, and CPU topk is
        # several times slower on rising rows than on falling ones.
        pages = self.bounds.shape[1]
        bounds, newest_first = self.bounds.flip(-1).topk(max(1, min(width, pages)), -1)
        return bounds, pages - 1 - newest_first

    def plan(self, max_dropped_mass: float, dense_below: int) -> tuple[Tensor, Tensor, Tensor]:
        """The pages each row reads (R, W), how many of them count (R,), and the groups decoded densely.

        Bounds come from the 4-bit sketch for KV heads without ALiBi whose newest pages are not nearly
        all in the support, and from the page minima and maxima for the others; the int8 sketch tightens
        them where they leave many pages open. The first group (the pages of highest bound) gives a
        threshold tau, a lower bound on the row's; a page whose bound B has (alpha-1) B <= tau holds
        only zero weights. The pages left are read best first until the weight the unread ones could
        take is at most ``max_dropped_mass`` (0: until none could take any). A KV head of a batch row
        whose query rows would gather more than DENSE_SHARE of its pages is decoded densely (exactly)
        instead: one pass over its keys for all of its query rows costs less than gathering them per
        row.
        """
        if int(self.visible_pages.max()) * self.cache.page_size < dense_below:
            return self._dense_plan()
        if max_dropped_mass == 0 and bool((self.alpha == 1).all()):
            # No softmax weight is zero: every page is read, and bounds would only add their cost.
            return self._dense_plan()
        # Without ALiBi, page minima and maxima in high dimension rule out a page only where its keys
        # barely vary (almost none of Gaussian keys, or of keys with large components orthogonal to the
        # queries), and they cost more than the 4-bit sketch: sparse content heads get that sketch
        # instead (the int8 one below 64 dimensions, where packing pads the 4-bit codes to 64). The
        # newest pages tell which rows are sparse before any bound exists.
        content = self._content_heads()
        first, flat = content, torch.zeros_like(content)
        tau = torch.full_like(self.alpha, -math.inf)
        if bool(content.any()):
            tau, newest_support = self._threshold_of_newest()
            if max_dropped_mass == 0:
                # A content head with a row nearly all in the support of its newest pages is read whole
                # (all keys alike, softmax): its bounds and their refinements would rule out little,
                # at up to the cost of a dense decode (measured: 1.7x-2x of it at 64k tokens).
                flat = content & (newest_support >= FLAT_SUPPORT).view(self._groups).any(-1)
                if bool(flat.all()):
                    return self._dense_plan()
            first = content & ~flat & self._sketchable(newest_support)
        coarse = self.cache.head_dim >= NIBBLE_BLOCK
        self.page_bounded = ~first & ~flat
        self.bounds = self._page_bounds(self.page_bounded)
        self._tighten_with_sketch(first, coarse)
        self.coarse_sketched = self._rows_of(first & coarse)
        best_tau, first_support = self._threshold_of_best()
        tau = torch.maximum(tau, best_tau)
        self.candidates = self._candidates(tau)
        int8_first = first & (not coarse)
        sketched = self._sketch_where_it_can_pay(first_support, int8_first | flat)
        self.sketched = self._rows_of(sketched | int8_first)
        if bool(sketched.any()):
            tau = torch.maximum(tau, self._threshold_of_best()[0])
            self.candidates = self._candidates(tau)
        width = FIRST_GROUP_PAGES
        read_whole = self._rows_of(flat)
        for _ in range(REFINEMENTS):
            # Reading 4x more of the best pages raises tau; it pays only where far more are candidates.
            width *= 4
            if int(self.candidates.masked_fill(read_whole, 0).max()) <= 4 * width:
                break
            tau = torch.maximum(tau, self._threshold_of_best(width)[0])
            self.candidates = self._candidates(tau)
        needed = self.candidates
        self.dropped = torch.zeros_like(tau)
        if max_dropped_mass > 0:
            bounds, _ = self._best_pages(int(needed.max()))
            page_mass = _mass_bound(bounds, tau[:, None], self.alpha[:, None]).nan_to_num(0.0)
            tail = (page_mass * self.cache.page_size).flip(-1).cumsum(-1).flip(-1)
            needed = (tail > max_dropped_mass).sum(-1)
            beyond = torch.cat([tail, tail.new_zeros(tail.shape[0], 1)], 1)
            self.dropped = beyond.gather(-1, needed[:, None])[:, 0]
        needed = torch.maximum(needed, torch.clamp(self.visible_pages, max=1))
        groups = self._groups
        gathered = needed.view(groups).amax(-1) * groups[-1]
        dense = gathered > DENSE_SHARE * self.visible_pages.view(groups).amax(-1)
        dense_rows = self._rows_of(dense)
        needed = needed.masked_fill(dense_rows, 0)
        self.dropped = self.dropped.masked_fill(dense_rows, 0.0)
        # Only now: rows of heads decoded densely need no pages, so the top-k is over fewer.
        _, pages = self._best_pages(int(needed.max()))
        return pages, needed, dense

    def _dense_plan(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every KV head dense, without bounds: what short caches get."""
        self.candidates = self.visible_pages
        self.dropped = torch.zeros(len(self.position), device=self.position.device)
        self.sketched = torch.zeros_like(self.position, dtype=torch.bool)
        self.coarse_sketched = self.sketched
        batch, kv_heads, _ = self._groups
        self.page_bounded = torch.zeros(batch, kv_heads, dtype=torch.bool, device=self.position.device)
        never = torch.zeros_like(self.position)
        return never[:, None], never, torch.ones(batch, kv_heads, dtype=torch.bool, device=never.device)

    def _rows_of(self, groups: Tensor) -> Tensor:
        """(R,): each row's value of its (batch row, KV head) entry in ``groups`` (B, Hkv)."""
        return groups[:, :, None].expand(self._groups).reshape(-1)

    @property
    def _groups(self) -> tuple[int, int, int]:
        """Rows grouped by (batch row, KV head): the heads sharing a KV head are consecutive."""
        batch, heads, n_q = self.shape
        return batch, self.cache.kv_heads, heads // self.cache.kv_heads * n_q

    def decode(
        self, max_dropped_mass: float, dense_below: int, alpha, alibi_slopes, counted: bool
    ) -> tuple[Tensor, DecodeStats | None]:
        """The output, and the stats (``counted`` False: none where every KV head decodes densely, and
        elsewhere without the support of densely decoded rows)."""
        cache = self.cache
        pages, needed, dense = self.plan(max_dropped_mass, dense_below)
        options = dict(window=self.window, softcap=self.softcap, sinks=self.sinks)
        if not counted and bool(dense.all()):
            # Short caches and softmax: the dense pass alone (rows that see no key stay zero). The
            # bookkeeping below costs 1-2 ms, a tenth of a dense decode over 16k keys.
            out = self.q.new_zeros(*self.shape, cache.value_dim)
            _dense_decode(self.q, cache, alpha, self.scale, alibi_slopes, options, dense, out, counted)
            return out, None
        scores = self._scores(pages, needed)
        p = _weights(self._with_sink(scores), self.alpha)[:, : scores.shape[1]]
        values = self._pages_of(cache.values, pages).flatten(1, 2).float()
        out = torch.bmm(p[:, None, :], values).squeeze(1).to(self.q.dtype).view(*self.shape, -1)
        keys_read = torch.isfinite(scores).sum(-1)
        support = (p > 0).sum(-1)
        support_pages = (p > 0).view(p.shape[0], pages.shape[1], cache.page_size).any(-1).sum(-1)
        bytes_per_key = cache.keys.element_size() * (cache.head_dim + cache.value_dim)
        bytes_read = int(keys_read.sum()) * bytes_per_key
        pages_read = needed.clone()
        dense_rows = self._rows_of(dense)
        page_count = cache.pages()[:, None].expand_as(dense)
        sketch_pages = page_count[self.sketched.view(self._groups).any(-1)]
        bytes_read += int(sketch_pages.sum()) * cache.page_size * (cache.head_dim + 2)
        coarse_pages = page_count[self.coarse_sketched.view(self._groups).any(-1)]
        bytes_read += int(coarse_pages.sum()) * cache.page_size * cache.key_nibbles.shape[-1]
        bounded_pages = page_count[self.page_bounded]
        bytes_read += int(bounded_pages.sum()) * 2 * cache.head_dim * cache.key_extremes.element_size()
        if bool(dense.any()):
            dense_support = _dense_decode(
                self.q, cache, alpha, self.scale, alibi_slopes, options, dense, out, counted
            )
            support = torch.where(dense_rows, dense_support.reshape(-1), support)
            seen = torch.clamp(self.position + 1 - self.first_key, min=0)
            keys_read = torch.where(dense_rows, seen, keys_read)
            pages_read = torch.where(dense_rows, self.visible_pages, pages_read)
            support_pages = support_pages.masked_fill(dense_rows, -1)
            first_key = self.first_key.view(self._groups).amin(-1)
            dense_keys = cache.lengths[:, None] - first_key
            bytes_read += int(dense_keys[dense].sum()) * bytes_per_key
        stats = DecodeStats(
            pages_read=self._view(pages_read),
            keys_read=self._view(keys_read),
            pages_visible=self._view(self.visible_pages),
            candidate_pages=self._view(self.candidates),
            support=self._view(support),
            support_pages=self._view(support_pages),
            dropped_mass_bound=self._view(self.dropped),
            bytes_read=bytes_read,
            dense=self._view(dense_rows),
            sketched=self._view(self.sketched),
            sketch_kernel=calibration(cache.device, cache.head_dim, cache.page_size).kernel
            if bool(self.sketched.any())
            else None,
            coarse_sketched=self._view(self.coarse_sketched),
            coarse_sketch_kernel=calibration(
                cache.device, nibble_dim(cache.head_dim), cache.page_size, coarse=True
            ).kernel
            if bool(self.coarse_sketched.any())
            else None,
        )
        return out, stats

    def _view(self, x: Tensor) -> Tensor:
        return x.view(self.shape)


def _unbounded_where_nan_(bound: Tensor) -> Tensor:
    """In place: a NaN bound (a NaN or infinite key or query entry) bounds nothing, the page must be read."""
    return bound.nan_to_num_(nan=math.inf, posinf=math.inf, neginf=-math.inf)


def _mass_bound(bound: Tensor, tau: Tensor, alpha: Tensor) -> Tensor:
    """The largest weight one key with score at most ``bound`` can have, given a threshold lower bound."""
    excess = ((alpha - 1) * bound - tau).clamp_min(0)
    entmax_mass = excess.pow(1 / (alpha - 1).clamp_min(1e-12))
    softmax_mass = torch.exp(bound - tau)
    return torch.where(alpha == 1, softmax_mass, entmax_mass).masked_fill(bound == -math.inf, 0.0)


def _weights(scores: Tensor, alpha: Tensor) -> Tensor:
    if bool((alpha == alpha[0]).all()):
        return entmax(scores, float(alpha[0]), dim=-1)
    return entmax(scores, alpha[:, None], dim=-1)


def _dense_decode(
    q: Tensor,
    cache: PagedKVCache,
    alpha,
    scale: float,
    alibi_slopes: Tensor | None,
    options: dict,
    groups: Tensor,
    out: Tensor,
    counted: bool,
) -> Tensor:
    """Dense attention of the (row, KV head) ``groups`` (B, Hkv) into ``out``; support if ``counted``.

    ``options``: the decode's window, softcap and sinks."""
    window, sinks = options["window"], options["sinks"]
    batch, heads, n_q, _ = q.shape
    group = heads // cache.kv_heads
    support = torch.zeros(batch, heads, n_q, dtype=torch.long, device=q.device)
    lengths = cache.lengths
    one_length = bool((lengths == lengths[0]).all())
    if bool(groups.all()) and int(lengths.min()) >= n_q and (one_length or (n_q == 1 and window is None)):
        # One call for the whole batch: rows are stored from page 0 on, i.e. right-padded, and
        # one query per row, or rows of one length, sit at the end of each row's keys (a window
        # counts back from the last key, so it needs rows of one length).
        length = int(lengths.max())
        # Keys before the first query's window are never read (nor copied).
        first_key = _window_start(length, n_q, window)
        keys = cache.keys.view(batch, cache.kv_heads, -1, cache.head_dim)[:, :, first_key:length]
        values = cache.values.view(batch, cache.kv_heads, -1, cache.value_dim)[:, :, first_key:length]
        causal = n_q > 1 or window is not None
        result = attention(
            q, keys, values, alpha=alpha, is_causal=causal, scale=scale, alibi_slopes=alibi_slopes,
            attn_mask=None if causal or one_length else KeyPadding(lengths, "right"), return_stats=counted,
            **options,
        )  # fmt: skip
        if counted:
            result, stats = result
            support.copy_(stats.support)
        out.copy_(result)
        return support
    for row in groups.any(-1).nonzero()[:, 0].tolist():
        keys, values = cache.dense(row)
        first_key = _window_start(keys.shape[2], n_q, window)
        keys, values = keys[:, :, first_key:], values[:, :, first_key:]
        seen = min(n_q, keys.shape[2])
        if seen == 0:
            continue
        # One call for all heads of the row when all are dense: the blocked backend batches them.
        spans = [(0, cache.kv_heads)] if bool(groups[row].all()) else [
            (g, g + 1) for g in groups[row].nonzero()[:, 0].tolist()
        ]  # fmt: skip
        for first_kv, end_kv in spans:
            first, last = first_kv * group, end_kv * group
            slopes = alibi_slopes
            if alibi_slopes is not None:
                slopes = (alibi_slopes[row] if alibi_slopes.dim() == 2 else alibi_slopes)[first:last]
            result = attention(
                q[row : row + 1, first:last, n_q - seen :],
                keys[:, first_kv:end_kv],
                values[:, first_kv:end_kv],
                alpha=alpha[first:last] if isinstance(alpha, Tensor) else alpha,
                is_causal=True,
                window=window,
                softcap=options["softcap"],
                sinks=None if sinks is None else sinks[first:last],
                scale=scale,
                alibi_slopes=slopes,
                return_stats=counted,
            )
            if counted:
                result, stats = result
                support[row, first:last, n_q - seen :] = stats.support[0]
            out[row, first:last, n_q - seen :] = result[0]
    return support


def _window_start(length: int, n_q: int, window: int | None) -> int:
    """The first of ``length`` keys that the window of the first of ``n_q`` queries at their end reaches."""
    return 0 if window is None else max(0, length - n_q - window + 1)


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_query(q: Tensor, cache: PagedKVCache) -> int:
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise ValueError("q must be a tensor (batch, heads, queries, head_dim)")
    batch, heads, n_q, dim = q.shape
    if batch != cache.batch or dim != cache.head_dim or heads % cache.kv_heads:
        raise ValueError(
            f"q must have shape ({cache.batch}, a multiple of {cache.kv_heads}, Nq, {cache.head_dim}), "
            f"got {tuple(q.shape)}"
        )
    if q.dtype != cache.dtype or q.device != cache.device:
        raise ValueError(f"q is {q.dtype} on {q.device}; the cache holds {cache.dtype} on {cache.device}")
    longest = int(cache.lengths.max())
    if n_q < 1 or n_q > longest:
        raise ValueError(f"q holds {n_q} queries; the cache's longest row holds {longest} keys")
    return heads


def _alpha_per_head(alpha: float | Tensor, heads: int, device: torch.device) -> Tensor:
    checked = _check_alpha(alpha, heads, device)
    if isinstance(checked, Tensor):
        return checked.detach().float()
    return torch.full((heads,), checked, device=device)


def _check_slopes(slopes: Tensor | None, batch: int, heads: int, device: torch.device) -> Tensor:
    if slopes is None:
        return torch.zeros(batch, heads, device=device)
    if not isinstance(slopes, Tensor) or slopes.shape not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape ({heads},) or ({batch}, {heads})")
    if slopes.device != device:
        raise ValueError(f"alibi_slopes is on {slopes.device}, q on {device}")
    if bool((slopes < 0).any()) or not bool(torch.isfinite(slopes).all()):
        raise ValueError("alibi_slopes must be finite and >= 0 (the bias is slope * (key_pos - query_pos))")
    return slopes.float().expand(batch, heads)
