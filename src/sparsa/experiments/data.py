"""Batches of task examples: training batches by step, evaluation sets by length."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..tasks import IGNORE, PAD, Example, Task
from ..tasks.base import example_rng, sample

TOKENS_PER_EVAL_BATCH = 1 << 15


def eval_batch_size(length_tokens: int, requested: int) -> int:
    """At most ``requested`` rows, and few enough that a batch holds about 32k tokens."""
    return max(1, min(requested, TOKENS_PER_EVAL_BATCH // max(1, length_tokens)))


@dataclass
class Batch:
    """tokens (B, N) right-padded with PAD, labels (B, N) with IGNORE where no loss applies."""

    tokens: Tensor
    labels: Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(self.tokens.to(device), self.labels.to(device))

    def rows(self, start: int, end: int) -> Batch:
        return Batch(self.tokens[start:end], self.labels[start:end])


def collate(examples: list[Example]) -> Batch:
    width = max(len(e.tokens) for e in examples)
    tokens = np.full((len(examples), width), PAD, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE, dtype=np.int64)
    for i, e in enumerate(examples):
        tokens[i, : len(e.tokens)] = e.tokens
        labels[i, : len(e.labels)] = e.labels
    return Batch(torch.from_numpy(tokens), torch.from_numpy(labels))


def training_example(task: Task, seed: int, index: int, min_length: int, max_length: int) -> Example:
    """Training example ``index``, its length uniform in [min_length, max_length], drawn from its own seed."""
    rng = example_rng(seed, "train", 0, index)
    return task.example(rng, int(rng.integers(min_length, max_length + 1)))


def training_batch(task: Task, seed: int, step: int, batch_size: int, lengths: tuple[int, int]) -> Batch:
    """The global batch of ``step``: examples step * batch_size ... , the same in every process."""
    first = step * batch_size
    return collate([training_example(task, seed, first + i, *lengths) for i in range(batch_size)])


def evaluation_examples(task: Task, seed: int, split: str, length: int, count: int) -> list[Example]:
    return [sample(task, seed, split, length, i) for i in range(count)]
