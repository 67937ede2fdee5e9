"""KV cache for decoding: per-layer key/value buffers that grow by doubling."""

from __future__ import annotations

from torch import Tensor


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


class KVCache:
    """One :class:`LayerCache` per layer; ``capacity`` preallocates room for that many tokens."""

    def __init__(self, n_layers: int, capacity: int = 0) -> None:
        self.layers = [LayerCache(capacity) for _ in range(n_layers)]

    @property
    def length(self) -> int:
        """Tokens cached so far."""
        return self.layers[0].length
