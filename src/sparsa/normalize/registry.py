"""Names of normalizers, read by the layers and the command line.

Every normalizer of the family is alpha-entmax for some alpha, so an entry is
a name, its alpha and a one-line description; the map itself is
``entmax(x, alpha, dim)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .maps import entmax


@dataclass(frozen=True)
class Normalizer:
    name: str
    alpha: float
    description: str

    def __call__(self, x: Tensor, dim: int = -1) -> Tensor:
        return entmax(x, self.alpha, dim)


NORMALIZERS: dict[str, Normalizer] = {}


def register_normalizer(name: str, alpha: float, description: str) -> Normalizer:
    if name in NORMALIZERS:
        raise ValueError(f"a normalizer named {name!r} is already registered")
    NORMALIZERS[name] = Normalizer(name, float(alpha), description)
    return NORMALIZERS[name]


def get_normalizer(name: str) -> Normalizer:
    """The registered normalizer called ``name``, or "entmax-<alpha>" for any alpha >= 1."""
    if name in NORMALIZERS:
        return NORMALIZERS[name]
    prefix = "entmax-"
    if name.startswith(prefix):
        try:
            alpha = float(name[len(prefix) :])
        except ValueError:
            alpha = float("nan")
        if alpha >= 1:
            return Normalizer(name, alpha, f"{alpha}-entmax")
    known = ", ".join(sorted(NORMALIZERS))
    raise ValueError(f"unknown normalizer {name!r}; known: {known}, or entmax-<alpha> with alpha >= 1")


register_normalizer("softmax", 1.0, "softmax (dense)")
register_normalizer("entmax15", 1.5, "1.5-entmax (sparse, the usual attention choice)")
register_normalizer("sparsemax", 2.0, "sparsemax (sparsest of the family)")
