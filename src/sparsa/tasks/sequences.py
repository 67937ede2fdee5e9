"""copy, reverse and sort: transform a random string of ``length`` symbols."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Task, register


@dataclass(frozen=True)
class _StringTask(Task):
    """``vocab`` symbols; ``distinct`` = 1 draws the source without repeats (needs length <= vocab)."""

    vocab: int = 32
    distinct: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab < 2:
            raise ValueError(f"{self.name}: vocab must be >= 2, got {self.vocab}")
        if self.distinct not in (0, 1):
            raise ValueError(f"{self.name}: distinct must be 0 or 1, got {self.distinct}")

    def check_length(self, length: int) -> None:
        super().check_length(length)
        if self.distinct and length > self.vocab:
            raise ValueError(
                f"{self.name}: distinct symbols need length <= vocab ({self.vocab}), got {length}"
            )

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(f"s{i}" for i in range(self.vocab))

    def source(self, rng: np.random.Generator, length: int) -> np.ndarray:
        if self.distinct:
            return 4 + rng.choice(self.vocab, size=length, replace=False)
        return 4 + rng.integers(0, self.vocab, size=length)


@register
@dataclass(frozen=True)
class Copy(_StringTask):
    """target = source."""

    name = "copy"

    def body(self, rng, length):
        source = self.source(rng, length)
        return source, source.copy()


@register
@dataclass(frozen=True)
class Reverse(_StringTask):
    """target = source reversed."""

    name = "reverse"

    def body(self, rng, length):
        source = self.source(rng, length)
        return source, source[::-1].copy()


@register
@dataclass(frozen=True)
class Sort(_StringTask):
    """target = source sorted ascending."""

    name = "sort"

    def body(self, rng, length):
        source = self.source(rng, length)
        return source, np.sort(source)
