"""Synthetic tasks for length generalization: one registry, generated on the fly from a seed."""

from . import recall, sequences, tagging, text
from .base import BOS, EOS, IGNORE, PAD, SEP, TASKS, Example, Task, make_task, sample

__all__ = [
    "BOS",
    "EOS",
    "IGNORE",
    "PAD",
    "SEP",
    "TASKS",
    "Example",
    "Task",
    "make_task",
    "recall",
    "sample",
    "sequences",
    "tagging",
    "text",
]
