"""What every synthetic task shares: special tokens, examples, the registry, seeded sampling.

An example is a token sequence with one label per position (-100 where no
loss applies). Generative tasks lay out ``[BOS] source [SEP] target [EOS]``
and label each position with the next token inside ``target [EOS]``; they
are evaluated by greedy decoding after ``[SEP]``. Classification tasks label
each input token with the symbol it should be mapped to and are evaluated in
one forward pass.

Sampling is reproducible across processes and machines: example ``index`` of
a split is drawn from numpy's PCG64 seeded with (seed, split, length, index),
so it does not depend on batch size, number of workers or what was drawn
before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

PAD = 0
"""Padding token id (every task's vocabulary starts with the four special tokens)."""
BOS = 1
"""Beginning of sequence."""
SEP = 2
"""Separates a task's input from its answer."""
EOS = 3
"""End of sequence: generation stops here."""
SPECIAL_TOKENS = ("<pad>", "<bos>", "<sep>", "<eos>")
IGNORE = -100
SPLITS = {"train": 0, "validation": 1, "test": 2, "export": 3}


@dataclass(frozen=True)
class Example:
    """tokens (n,) and labels (n,) int64 (IGNORE where no loss); ``prompt`` tokens precede the answer."""

    tokens: np.ndarray
    labels: np.ndarray
    prompt: int

    @property
    def answer(self) -> np.ndarray:
        """The tokens a generative model must produce after the prompt (target and EOS)."""
        return self.tokens[self.prompt :]


class Task:
    """A task family: subclasses are dataclasses of their parameters and implement ``body``."""

    name: str = ""
    kind: str = "generate"  # or "classify"
    symbols: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, str):
                if not isinstance(value, str):
                    raise TypeError(f"{self.name}.{f.name} must be text, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{self.name}.{f.name} must be a number, got {value!r}")

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.symbols)

    def token_names(self) -> list[str]:
        return [*SPECIAL_TOKENS, *self.symbols]

    def symbol(self, name: str) -> int:
        return len(SPECIAL_TOKENS) + self.symbols.index(name)

    def body(self, rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, target) for a generative task, (tokens, labels) for a classification task."""
        raise NotImplementedError

    def check_length(self, length: int) -> None:
        if length < 1:
            raise ValueError(f"{self.name}: length must be >= 1, got {length}")

    def example(self, rng: np.random.Generator, length: int, split: str = "train") -> Example:
        """An example of ``length`` drawn with ``rng``; tasks over a corpus draw it from ``split``."""
        self.check_length(length)
        first, second = self.body(rng, length)
        if self.kind == "classify":
            tokens = np.concatenate(([BOS], first)).astype(np.int64)
            labels = np.concatenate(([IGNORE], second)).astype(np.int64)
            return Example(tokens, labels, prompt=len(tokens))
        tokens = np.concatenate(([BOS], first, [SEP], second, [EOS])).astype(np.int64)
        prompt = len(first) + 2
        labels = np.full(len(tokens), IGNORE, dtype=np.int64)
        labels[prompt - 1 : -1] = tokens[prompt:]
        return Example(tokens, labels, prompt)

    def parameters(self) -> dict:
        return dataclasses.asdict(self)


def example_rng(seed: int, split: str, length: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, SPLITS[split], length, index]))


def sample(task: Task, seed: int, split: str, length: int, index: int) -> Example:
    """Example ``index`` of ``split`` at ``length``: the same on every machine for the same arguments."""
    task.check_length(length)
    return task.example(example_rng(seed, split, length, index), length, split)


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    if cls.name in TASKS:
        raise ValueError(f"a task named {cls.name!r} is already registered")
    TASKS[cls.name] = cls
    return cls


def make_task(name: str, **parameters) -> Task:
    """The task ``name`` with ``parameters`` (names as in its dataclass; see ``task_parameters``)."""
    typed = task_parameters(name, parameters)
    return TASKS[name](**typed)


def task_parameters(name: str, parameters: dict) -> dict:
    """``parameters`` of task ``name`` cast to their fields' types; text such as "8" or "0.5" is parsed.

    An integer field takes an integer, a whole float or its text and nothing
    else, so that ``vocab=1.5`` is refused rather than truncated; a text field
    takes text.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    fields = {f.name: f for f in dataclasses.fields(TASKS[name])}
    unknown = sorted(set(parameters) - set(fields))
    if unknown:
        raise ValueError(f"task {name!r} has no parameter {unknown}; its parameters: {sorted(fields)}")
    typed = {}
    for key, value in parameters.items():
        kind = type(fields[key].default)
        typed[key] = value if kind is str and isinstance(value, str) else _cast(value, kind)
        if typed[key] is None:
            expected = {int: "an integer", float: "a number", str: "text"}[kind]
            raise ValueError(f"task {name!r}: option {key} takes {expected}, got {value!r}")
    return typed


def _cast(value, kind: type) -> int | float | None:
    if isinstance(value, bool) or kind is str:
        return None
    try:
        number = float(value) if kind is float else (int(value) if isinstance(value, str) else value)
    except ValueError:
        return None
    if kind is int and isinstance(number, float):
        return int(number) if number.is_integer() else None
    return number if isinstance(number, int | float) else None
