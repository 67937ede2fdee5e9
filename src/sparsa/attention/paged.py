"""A paged KV cache and certified sparse decoding: read only the pages that can hold weight.

The cache keeps each (batch row, KV head)'s keys in pages of ``page_size``
tokens, with the elementwise minimum and maximum of every page's keys. For a
query q, sum_d max(q_d min_d, q_d max_d) bounds q.k over a page from above
(plus the page's best ALiBi bias), without reading its keys.

Decoding is exact by a certificate (docs/mathematics.md, section 1): the
threshold tau of any subset of a row's keys is a lower bound on the row's
tau, and a key with (alpha-1) score <= tau has weight zero. ``decode`` reads
the pages with the highest bounds first (a first group), takes the threshold
of what it read, and then reads every page whose bound could still beat it;
the pages left unread provably hold only zero weights, so the result equals
dense attention over the whole cache. For softmax (alpha = 1) no key is
provably zero and every page is read. ``max_dropped_mass=eps`` stops earlier,
once the weight the unread pages could take is provably at most eps. When
the pages to read are a large share of the cache, the dense path is cheaper
than gathering them, and ``decode`` runs it instead (exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor

from .masks import KeyPadding

FIRST_GROUP_PAGES = 8
"""Pages read before the first threshold: enough to hold the support of a sharp row."""

DENSE_SHARE = 0.5
"""Above this share of the cache's pages to gather, the dense path is cheaper than gathering them."""

BOUND_MARGIN = 1e-5
"""Relative slack on bounds and thresholds, so that rounding can never certify a key that has weight."""


class PagedKVCache:
    """Keys and values of one attention layer in pages of ``page_size`` tokens per (batch row, KV head).

    Each batch row holds its own number of tokens (``lengths``), stored from
    page 0 on without padding. ``append`` adds a chunk of tokens, one or many,
    to every row (with a :class:`KeyPadding` saying which tokens of the chunk
    are real for each row) and updates the per-page key minima and maxima
    that bound the scores. Storage grows by doubling.
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
        summary = torch.empty(batch, kv_heads, 0, head_dim, dtype=torch.float32, device=device)
        self.key_min, self.key_max = summary, summary.clone()

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
        flat_values = self.values.view(self.batch, self.kv_heads, -1, self.values.shape[-1])
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
        values = self.values[row : row + 1].reshape(1, self.kv_heads, -1, self.values.shape[-1])
        return keys, values[:, :, :length]

    def _summarise(self, row: int, first_page: int, end_page: int, length: int) -> None:
        pages = self.keys[row, :, first_page:end_page].float()
        slots = torch.arange(first_page * self.page_size, end_page * self.page_size, device=self.device)
        filled = (slots < length).view(1, end_page - first_page, self.page_size, 1)
        self.key_min[row, :, first_page:end_page] = pages.masked_fill(~filled, math.inf).amin(2)
        self.key_max[row, :, first_page:end_page] = pages.masked_fill(~filled, -math.inf).amax(2)

    def _reserve(self, tokens: int) -> None:
        needed = -(-tokens // self.page_size)
        if needed <= self.page_capacity:
            return
        size = max(needed, 2 * self.page_capacity)
        for name in ("keys", "values", "key_min", "key_max"):
            old = getattr(self, name)
            # Zeros, not garbage: weight-zero slots of a gathered page must not bring NaN into p @ V.
            grown = old.new_zeros(old.shape[0], old.shape[1], size, *old.shape[3:])
            grown[:, :, : old.shape[2]] = old
            setattr(self, name, grown)

    def _check_chunk(self, k: Tensor, v: Tensor) -> None:
        for name, x, width in (("k", k, self.head_dim), ("v", v, self.values.shape[-1])):
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
    beat the first threshold (a page holding support is always one);
    support / support_pages: keys with nonzero weight and the pages holding
    them; dropped_mass_bound: a proven upper bound on the weight of the keys
    left unread (0 when exact); bytes_read: keys and values read over the
    whole call, pages of every KV head counted once per query row;
    dense: whether the call ran the dense path.
    """

    pages_read: Tensor
    keys_read: Tensor
    pages_visible: Tensor
    candidate_pages: Tensor
    support: Tensor
    support_pages: Tensor
    dropped_mass_bound: Tensor
    bytes_read: int
    dense: bool


def decode(
    q: Tensor,
    cache: PagedKVCache,
    *,
    alpha: float | Tensor = 1.5,
    scale: float | None = None,
    alibi_slopes: Tensor | None = None,
    max_dropped_mass: float = 0.0,
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
        max_dropped_mass: 0 (default) is exact: the same as
            ``sparsa.attention(q, K, V, alpha=alpha, is_causal=True,
            attn_mask=KeyPadding(lengths, "left"), alibi_slopes=...)`` over the
            left-padded cache. eps > 0 stops reading once the weight that all
            unread keys could still take is at most eps (reported per row).
        return_stats: also return :class:`DecodeStats`.
    """
    heads = _check_query(q, cache)
    alpha_heads = _check_alpha(alpha, heads, q.device)
    scale = 1 / math.sqrt(q.shape[3]) if scale is None else _check_positive("scale", scale)
    if isinstance(max_dropped_mass, bool) or not isinstance(max_dropped_mass, Real):
        raise TypeError(f"max_dropped_mass must be a number, got {type(max_dropped_mass).__name__}")
    if not 0 <= max_dropped_mass < 1:
        raise ValueError(f"max_dropped_mass must lie in [0, 1), got {max_dropped_mass}")
    slopes = _check_slopes(alibi_slopes, q.shape[0], heads, q.device)
    rows = _Rows(q, cache, alpha_heads, slopes, scale)
    plan = rows.plan(float(max_dropped_mass))
    if plan is None:
        out = _dense_decode(q, cache, alpha, scale, alibi_slopes)
        return (out, rows.dense_stats(out)) if return_stats else out
    out, stats = rows.read(plan)
    return (out, stats) if return_stats else out


class _Rows:
    """The query rows of one decode call, flattened to (R = B * H * Nq,), with their page bounds."""

    def __init__(self, q: Tensor, cache: PagedKVCache, alpha: Tensor, slopes: Tensor, scale: float) -> None:
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
        self.query = q.reshape(-1, dim).float()
        self.visible_pages = torch.where(
            self.position >= 0, self.position.div(cache.page_size, rounding_mode="floor") + 1, 0
        )
        self.bounds = self._page_bounds()
        self.bounds_sorted, self.order = self.bounds.sort(-1, descending=True)

    def _page_bounds(self) -> Tensor:
        """(R, pages): an upper bound on the score of every key of each page the row sees (-inf: none).

        max_d(q_d min_d, q_d max_d) summed over d is relu(q) . max - relu(-q) . min: two matrix
        products per KV head over the page summaries, for the query heads of its group together.
        """
        cache, batch = self.cache, self.shape[0]
        pages = max(1, int(self.visible_pages.max()))
        low, high = cache.key_min[:, :, :pages], cache.key_max[:, :, :pages]
        q = self.query.view(batch, cache.kv_heads, -1, cache.head_dim)
        dot = q.clamp_min(0) @ high.transpose(-1, -2) - (-q).clamp_min(0) @ low.transpose(-1, -2)
        size = q.abs() @ torch.maximum(low.abs(), high.abs()).transpose(-1, -2)
        bound = (dot + BOUND_MARGIN * size).reshape(-1, pages) * self.scale
        page = torch.arange(pages, device=q.device)
        last_key = torch.minimum((page + 1) * cache.page_size - 1, self.position[:, None])
        bound = bound + self.slope[:, None] * (last_key - self.position[:, None])
        return bound.masked_fill(page >= self.visible_pages[:, None], -math.inf)

    def _scores(self, count: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """Scores (R, width * P) of each row's top ``count`` pages by bound; the page indices (R, width)."""
        cache = self.cache
        width = max(1, width)
        pages = self.order[:, :width]
        if pages.shape[1] < width:
            pages = torch.cat([pages, pages.new_zeros(pages.shape[0], width - pages.shape[1])], 1)
        taken = torch.arange(width, device=pages.device) < count[:, None]
        keys = cache.keys[self.b[:, None], self.g[:, None], pages]
        scores = torch.bmm(keys.flatten(1, 2).float(), self.query[:, :, None]).squeeze(-1) * self.scale
        slot = pages[:, :, None] * cache.page_size + torch.arange(cache.page_size, device=pages.device)
        slot = slot.flatten(1)
        scores = scores + self.slope[:, None] * (slot - self.position[:, None])
        visible = (slot <= self.position[:, None]) & taken.repeat_interleave(cache.page_size, 1)
        return scores.masked_fill(~visible, -math.inf), pages

    def plan(self, max_dropped_mass: float) -> Tensor | None:
        """Pages each row must read (R,), or None where the dense path is cheaper."""
        first = torch.clamp(self.visible_pages, max=FIRST_GROUP_PAGES)
        scores, _ = self._scores(first, int(first.max()))
        tau = _thresholds(scores, self.alpha)
        tau = tau - BOUND_MARGIN * (1 + tau.abs())
        self.first_tau = tau
        mass = _mass_bound(self.bounds_sorted, tau[:, None], self.alpha[:, None]) * self.cache.page_size
        mass = mass.nan_to_num(0.0)
        tail = mass.flip(-1).cumsum(-1).flip(-1)
        self.candidates = (mass > 0).sum(-1)
        needed = (tail > max_dropped_mass).sum(-1) if max_dropped_mass > 0 else self.candidates
        needed = torch.maximum(needed, torch.clamp(self.visible_pages, max=1))
        self.dropped = torch.where(
            needed < mass.shape[1], tail.gather(-1, needed.clamp(max=mass.shape[1] - 1)[:, None])[:, 0], 0.0
        )
        total = int(self.visible_pages.sum())
        if int(needed.max()) * needed.shape[0] > DENSE_SHARE * max(1, total):
            self.dropped = torch.zeros_like(self.dropped)
            return None
        return needed

    def read(self, needed: Tensor) -> tuple[Tensor, DecodeStats]:
        cache = self.cache
        width = int(needed.max())
        scores, pages = self._scores(needed, width)
        p = _weights(scores, self.alpha)
        values = cache.values[self.b[:, None], self.g[:, None], pages].flatten(1, 2).float()
        out = torch.bmm(p[:, None, :], values).squeeze(1)
        out = out.to(self.q.dtype).view(*self.shape, -1)
        in_page = (p > 0).view(p.shape[0], max(1, width), cache.page_size)
        keys_read = torch.isfinite(scores).sum(-1)
        element = cache.keys.element_size()
        bytes_read = int(keys_read.sum()) * element * (cache.head_dim + cache.values.shape[-1])
        stats = DecodeStats(
            pages_read=self._view(needed),
            keys_read=self._view(keys_read),
            pages_visible=self._view(self.visible_pages),
            candidate_pages=self._view(self.candidates),
            support=self._view((p > 0).sum(-1)),
            support_pages=self._view(in_page.any(-1).sum(-1)),
            dropped_mass_bound=self._view(self.dropped),
            bytes_read=bytes_read,
            dense=False,
        )
        return out, stats

    def dense_stats(self, out: Tensor) -> DecodeStats:
        cache = self.cache
        keys = torch.clamp(self.position + 1, min=0)
        element = cache.keys.element_size()
        bytes_read = int(keys.sum()) * element * (cache.head_dim + cache.values.shape[-1])
        unknown = torch.full_like(keys, -1)
        return DecodeStats(
            pages_read=self._view(self.visible_pages),
            keys_read=self._view(keys),
            pages_visible=self._view(self.visible_pages),
            candidate_pages=self._view(self.candidates),
            support=self._view(unknown),
            support_pages=self._view(unknown),
            dropped_mass_bound=self._view(self.dropped),
            bytes_read=bytes_read,
            dense=True,
        )

    def _view(self, x: Tensor) -> Tensor:
        return x.view(self.shape)


def _thresholds(scores: Tensor, alpha: Tensor) -> Tensor:
    """Per row: tau of entmax (alpha > 1, units of (alpha-1) * score) or log-partition (alpha = 1)."""
    p = _weights(scores, alpha)
    top, index = p.max(-1)
    score = scores.gather(-1, index[:, None])[:, 0]
    entmax_tau = (alpha - 1) * score - top.clamp_min(1e-38).pow(alpha - 1)
    softmax_tau = score - top.clamp_min(1e-38).log()
    return torch.where(top > 0, torch.where(alpha == 1, softmax_tau, entmax_tau), math.inf)


def _mass_bound(bound: Tensor, tau: Tensor, alpha: Tensor) -> Tensor:
    """The largest weight one key with score at most ``bound`` can have, given a threshold lower bound."""
    excess = ((alpha - 1) * bound - tau).clamp_min(0)
    entmax_mass = excess.pow(1 / (alpha - 1).clamp_min(1e-12))
    softmax_mass = torch.exp(bound - tau)
    return torch.where(alpha == 1, softmax_mass, entmax_mass).masked_fill(bound == -math.inf, 0.0)


def _weights(scores: Tensor, alpha: Tensor) -> Tensor:
    from ..normalize import entmax

    if bool((alpha == alpha[0]).all()):
        return entmax(scores, float(alpha[0]), dim=-1)
    return entmax(scores, alpha[:, None], dim=-1)


def _dense_decode(q: Tensor, cache: PagedKVCache, alpha, scale: float, alibi_slopes: Tensor | None) -> Tensor:
    from .api import attention

    batch, heads, n_q, _ = q.shape
    out = q.new_zeros(batch, heads, n_q, cache.values.shape[-1])
    for row in range(batch):
        keys, values = cache.dense(row)
        seen = min(n_q, keys.shape[2])
        if seen == 0:
            continue
        slopes = alibi_slopes
        if alibi_slopes is not None and alibi_slopes.dim() == 2:
            slopes = alibi_slopes[row]
        out[row : row + 1, :, n_q - seen :] = attention(
            q[row : row + 1, :, n_q - seen :],
            keys,
            values,
            alpha=alpha,
            is_causal=True,
            scale=scale,
            alibi_slopes=slopes,
        )
    return out


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


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


def _check_alpha(alpha: float | Tensor, heads: int, device: torch.device) -> Tensor:
    from .api import _check_alpha as check

    checked = check(alpha, heads, device)
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
