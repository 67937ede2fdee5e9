"""Retrieval: multi-query multi-token associative recall (MQMTAR), lookup, and flip-flop."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .base import IGNORE, SEP, Task, register


@register
@dataclass(frozen=True)
class MQMTAR(Task):
    """Key-value pairs ``k.. : v.. _`` scattered among ``_`` tokens; queries ``Q k..`` ask for ``Q v..``.

    ``length`` is the length of the context (pairs and spaces); it holds
    about ``density * length / (key_tokens + value_tokens + 2)`` pairs, all
    keys distinct. ``queries`` keys of the context are asked, in random order.
    Keys and values come from vocabularies of ``n_keys`` and ``n_values``
    strings over ``alphabet`` symbols, drawn once from ``vocab_seed`` so that
    training and test share them.
    """

    name = "mqmtar"
    alphabet: int = 256
    key_tokens: int = 2
    value_tokens: int = 2
    queries: int = 4
    density: float = 0.8
    n_keys: int = 4096
    n_values: int = 4096
    vocab_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("alphabet", "key_tokens", "value_tokens", "queries", "n_keys", "n_values"):
            if getattr(self, field) < 1:
                raise ValueError(f"mqmtar: {field} must be >= 1, got {getattr(self, field)}")
        if not 0 < self.density <= 1:
            raise ValueError(f"mqmtar: density must lie in (0, 1], got {self.density}")
        for count, tokens, name in (
            (self.n_keys, self.key_tokens, "n_keys"),
            (self.n_values, self.value_tokens, "n_values"),
        ):
            if count > self.alphabet**tokens:
                raise ValueError(
                    f"mqmtar: {name} ({count}) exceeds alphabet ** tokens ({self.alphabet**tokens})"
                )

    @property
    def symbols(self) -> tuple[str, ...]:
        return ("_", ":", "Q", *(f"a{i}" for i in range(self.alphabet)))

    @cached_property
    def vocabularies(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.Generator(np.random.PCG64([self.vocab_seed, 7]))
        first = self.symbol("a0")

        def strings(count: int, tokens: int) -> np.ndarray:
            codes = rng.choice(self.alphabet**tokens, size=count, replace=False)
            digits = (codes[:, None] // self.alphabet ** np.arange(tokens)[::-1]) % self.alphabet
            return first + digits

        return strings(self.n_keys, self.key_tokens), strings(self.n_values, self.value_tokens)

    def pairs_for(self, length: int) -> int:
        return max(self.queries, int(self.density * length / (self.key_tokens + self.value_tokens + 2)))

    def check_length(self, length: int) -> None:
        pair = self.key_tokens + self.value_tokens + 2
        if length < self.queries * pair:
            raise ValueError(f"mqmtar: length must be >= {self.queries * pair} to hold {self.queries} pairs")
        if self.pairs_for(length) > self.n_keys:
            raise ValueError(f"mqmtar: length {length} needs more than n_keys={self.n_keys} distinct keys")

    def body(self, rng, length):
        keys, values = self.vocabularies
        n_pairs = self.pairs_for(length)
        pair = self.key_tokens + self.value_tokens + 2
        space, colon, query = self.symbol("_"), self.symbol(":"), self.symbol("Q")
        key_ids = rng.choice(len(keys), size=n_pairs, replace=False)
        value_ids = rng.integers(0, len(values), size=n_pairs)
        # Spread the spare spaces over the n_pairs + 1 gaps between pairs.
        spare = length - n_pairs * pair
        cuts = np.sort(rng.integers(0, spare + 1, size=n_pairs))
        gaps = np.diff(np.concatenate(([0], cuts, [spare])))
        context = []
        for i in range(n_pairs):
            context += [space] * int(gaps[i])
            context += [*keys[key_ids[i]], colon, *values[value_ids[i]], space]
        context += [space] * int(gaps[-1])
        asked = rng.choice(n_pairs, size=self.queries, replace=False)
        questions, answers = [], []
        for i in asked:
            questions += [query, *keys[key_ids[i]]]
            answers += [query, *values[value_ids[i]]]
        return np.array(context + questions), np.array(answers)


@register
@dataclass(frozen=True)
class Lookup(Task):
    """A context of ``length`` symbols, then ``queries`` of them, each labelled with the symbol after it.

    ``[BOS] context [SEP] x_1 .. x_q``: each x_i occurs exactly once in the
    context, not last, and the label at x_i is the symbol that follows it
    there, so one lookup answers it at any context length. Other symbols are
    drawn with repeats from the ``vocab`` symbols, so the vocabulary bounds
    no length. The answer stays ``queries`` tokens long; a classification
    task, scored in one forward pass (exact match per query = token accuracy).
    """

    name = "lookup"
    kind = "classify"
    vocab: int = 1024
    queries: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.queries < 1:
            raise ValueError(f"lookup: queries must be >= 1, got {self.queries}")
        if self.vocab <= self.queries:
            raise ValueError(f"lookup: vocab must exceed queries ({self.queries}), got {self.vocab}")

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(f"s{i}" for i in range(self.vocab))

    def check_length(self, length: int) -> None:
        if length <= self.queries:
            raise ValueError(f"lookup: length must exceed queries ({self.queries}) to give each a successor")

    def body(self, rng, length):
        first = self.symbol("s0")
        asked = rng.choice(self.vocab, size=self.queries, replace=False)
        others = np.setdiff1d(np.arange(self.vocab), asked)
        context = others[rng.integers(0, len(others), size=length)]
        places = rng.choice(length - 1, size=self.queries, replace=False)
        context[places] = asked
        order = rng.permutation(self.queries)
        tokens = np.concatenate((first + context, [SEP], first + asked[order]))
        labels = np.full(len(tokens), IGNORE)
        labels[length + 1 :] = first + context[places[order] + 1]
        return tokens, labels


@register
@dataclass(frozen=True)
class FlipFlop(Task):
    """``length // 2`` (instruction, bit) pairs: write, then write or ignore, and a final read.

    Each middle instruction is a write with probability ``p_write``; the
    target is the bit of the last write.
    """

    name = "flipflop"
    p_write: float = 0.1
    symbols = ("w", "i", "r", "0", "1")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.p_write <= 1:
            raise ValueError(f"flipflop: p_write must lie in [0, 1], got {self.p_write}")

    def check_length(self, length: int) -> None:
        if length < 4:
            raise ValueError(f"flipflop: length must be >= 4, got {length}")

    def body(self, rng, length):
        n = length // 2
        write, ignore, read, zero = (self.symbol(s) for s in ("w", "i", "r", "0"))
        instructions = np.where(rng.random(n) < self.p_write, write, ignore)
        instructions[0], instructions[-1] = write, read
        bits = zero + rng.integers(0, 2, size=n)
        last_write = np.flatnonzero(instructions == write)[-1]
        source = np.stack((instructions, bits), axis=1).reshape(-1)
        return source, np.array([bits[last_write]])
