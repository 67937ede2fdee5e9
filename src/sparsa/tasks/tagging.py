"""Token classification: local count and n-back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import IGNORE, Task, register


@register
@dataclass(frozen=True)
class LocalCount(Task):
    """Blocks of a repeated symbol (2..max_reps long, neighbours differ); label: 0-based count in it."""

    name = "local_count"
    kind = "classify"
    vocab: int = 8
    max_reps: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab < 2 or self.max_reps < 2:
            raise ValueError("local_count: vocab and max_reps must be >= 2")

    @property
    def symbols(self) -> tuple[str, ...]:
        return (*(f"s{i}" for i in range(self.vocab)), *(f"c{i}" for i in range(self.max_reps)))

    def body(self, rng, length):
        tokens, labels = [], []
        previous = -1
        while len(tokens) < length:
            symbol = int(rng.integers(0, self.vocab - 1))
            symbol += symbol >= previous >= 0  # skip the previous block's symbol
            reps = int(rng.integers(2, self.max_reps + 1))
            tokens += [4 + symbol] * reps
            labels += [4 + self.vocab + c for c in range(reps)]
            previous = symbol
        return np.array(tokens[:length]), np.array(labels[:length])


@register
@dataclass(frozen=True)
class NBack(Task):
    """Random symbols; the label of each token is the token ``n`` positions earlier (none for the first n)."""

    name = "nback"
    kind = "classify"
    vocab: int = 8
    n: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab < 2 or self.n < 1:
            raise ValueError("nback: vocab must be >= 2 and n >= 1")

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(f"s{i}" for i in range(self.vocab))

    def body(self, rng, length):
        tokens = 4 + rng.integers(0, self.vocab, size=length)
        labels = np.full(length, IGNORE)
        labels[self.n :] = tokens[: -self.n] if self.n < length else labels[self.n :]
        return tokens, labels
