"""KV caches for decoding: per-layer buffers that grow by doubling, or pages that decode sparsely."""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention import KeyPadding, PagedKVCache, decode
from ..layers.positions import TokenLayout


class LayerCache:
    """Keys and values (B, Hkv, T, D) of one layer; ``update`` appends and returns all of them."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.length = 0
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(k, v, max(end, self.capacity, 2 * self.length))
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _grow(self, k: Tensor, v: Tensor, size: int) -> None:
        keys = k.new_empty(k.shape[0], k.shape[1], size, k.shape[3])
        values = v.new_empty(v.shape[0], v.shape[1], size, v.shape[3])
        if self.keys is not None:
            keys[:, :, : self.length] = self.keys[:, :, : self.length]
            values[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = keys, values


class PagedLayerCache:
    """One layer's keys and values in a :class:`sparsa.attention.PagedKVCache`, attended by ``decode``.

    Padding columns are not stored: each row keeps its real tokens only, and
    ``decode`` reads only the pages that can hold weight, with exactly the
    result of dense attention. ``length`` counts the columns seen (padding
    included), as the model's attention mask does. Needs causal attention and
    left padding (as generation uses).
    """

    def __init__(self, page_size: int = 16) -> None:
        self.page_size = page_size
        self.length = 0
        self.pages: PagedKVCache | None = None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, **options) -> Tensor:
        """Append this chunk's real keys and values, then attend q (B, H, N, D) over the whole cache."""
        if not options.get("is_causal", False):
            raise ValueError("a paged cache decodes causal attention only")
        padding = layout.key_padding
        if padding is not None and padding.side != "left":
            raise ValueError("a paged cache needs left padding (as generation uses), got right padding")
        if "row_map" in options:
            raise ValueError(
                f"a paged cache certifies alpha-entmax weights; row map {options['row_map']!r} decodes with "
                "the dense cache (page_size=None)"
            )
        n = k.shape[2]
        if self.pages is None:
            self.pages = PagedKVCache.like(k, v, self.page_size)
        real = torch.clamp(layout.key_count - self.pages.lengths, 0, n)
        self.pages.append(k, v, KeyPadding(real, "left"))
        self.length += n
        # q holds the last n_q of the n new tokens (all of them unless the model asked for fewer).
        n_q = q.shape[2]
        seen = min(n_q, int(self.pages.lengths.max()))
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        if seen:
            out[:, :, n_q - seen :] = decode(
                q[:, :, n_q - seen :],
                self.pages,
                alpha=options["alpha"],
                alibi_slopes=options["alibi_slopes"],
                window=options["window"],
            )
        return out


class KVCache:
    """One cache per layer; ``capacity`` preallocates room for that many tokens.

    ``page_size`` None keeps dense buffers (:class:`LayerCache`); a number
    pages them (:class:`PagedLayerCache`) for certified sparse decoding.
    """

    def __init__(self, n_layers: int, capacity: int = 0, *, page_size: int | None = None) -> None:
        if page_size is None:
            self.layers = [LayerCache(capacity) for _ in range(n_layers)]
        else:
            self.layers = [PagedLayerCache(page_size) for _ in range(n_layers)]

    @property
    def length(self) -> int:
        """Tokens cached so far."""
        return self.layers[0].length
