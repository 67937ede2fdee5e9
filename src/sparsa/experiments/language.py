"""Language-model evaluation: bits per byte beyond the training context, and passkey retrieval.

Bits per byte: the model reads non-overlapping windows of ``context`` bytes
of the test split (each after BOS, inside one document) and is scored on
every next byte; the mean cross-entropy over all scored bytes, in bits, and
the same per position in the window (where a model breaks down shows as a
rise after its training context). Passkey: documents of ``length`` bytes with
the key at each depth, scored teacher-forced on the key's five digits (exact
when all five are the argmax).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..models import Transformer
from ..tasks import BOS
from ..tasks.base import SPLITS, example_rng
from ..tasks.text import FIRST_BYTE, KEY_DIGITS, Text, load_corpus
from .data import collate, eval_batch_size

PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def bits_per_byte(
    model: Transformer,
    task: Text,
    context: int,
    *,
    max_windows: int,
    batch_size: int = 64,
    split: str = "test",
) -> dict:
    """Bits per byte over up to ``max_windows`` windows of ``context`` bytes of ``split``, and by position.

    The windows are non-overlapping and evenly spaced over the split (Corpus.windows).
    """
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    windows = load_corpus(task.corpus).windows(split, context, max_windows)
    if not windows:
        raise ValueError(f"no document of the {split} split of corpus {task.corpus!r} holds {context} bytes")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    by_position = torch.zeros(context, dtype=torch.float64)
    correct = 0
    rows = eval_batch_size(context + 1, batch_size)
    for start in range(0, len(windows), rows):
        chunk = torch.from_numpy(np.stack(windows[start : start + rows]).astype(np.int64) + FIRST_BYTE)
        tokens = torch.cat((torch.full((len(chunk), 1), BOS), chunk[:, :-1]), dim=1).to(device)
        logits = model(tokens).float()
        targets = chunk.to(device)
        losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        by_position += losses.sum(0).double().cpu()
        correct += int((logits.argmax(-1) == targets).sum())
    model.train(was_training)
    per_position = (by_position / len(windows) / math.log(2)).tolist()
    return {
        "length": context,
        "windows": len(windows),
        "bits_per_byte": sum(per_position) / context,
        "byte_accuracy": 100.0 * correct / (len(windows) * context),
        "bits_by_position": per_position,
    }


@torch.no_grad()
def passkey_accuracy(
    model: Transformer,
    task: Text,
    length: int,
    *,
    trials: int,
    seed: int = 0,
    depths: tuple[float, ...] = PASSKEY_DEPTHS,
    split: str = "test",
) -> dict:
    """Exact match (%) of the key's digits, teacher-forced, per depth, over ``trials`` documents each."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    accuracy = {}
    rows = eval_batch_size(length + 1, trials)
    for index, depth in enumerate(depths):
        examples = [
            task.passkey(example_rng(seed, split, length, index * trials + trial), length, split, depth)[0]
            for trial in range(trials)
        ]
        right = 0
        for start in range(0, trials, rows):
            batch = collate(examples[start : start + rows]).to(device)
            predicted = model(batch.tokens, logits_to_keep=KEY_DIGITS + 1).argmax(-1)
            labels = batch.labels[:, -KEY_DIGITS - 1 :]
            right += int(((predicted == labels) | (labels < 0)).all(-1).sum())
        accuracy[f"{depth:g}"] = 100.0 * right / trials
    model.train(was_training)
    return {"length": length, "trials": trials, "passkey_exact_match": accuracy}


def language_scores(
    model: Transformer, task: Text, length: int, *, examples: int, seed: int, split: str = "test"
) -> dict:
    """One results row at ``length`` bytes: bits per byte over up to ``examples`` windows, and passkey.

    ``exact_match`` is the passkey exact match (mean over the depths, ``examples``
    documents per depth; per depth in ``passkey_by_depth``), ``token_accuracy``
    the next-byte accuracy of the windows, so the tables and selection of the
    synthetic tasks apply.
    """
    text = bits_per_byte(model, task, length, max_windows=examples, split=split)
    passkey = passkey_accuracy(model, task, length, trials=examples, seed=seed, split=split)
    by_depth = passkey["passkey_exact_match"]
    return {
        "length": length,
        "examples": text["windows"],
        "exact_match": sum(by_depth.values()) / len(by_depth),
        "token_accuracy": text["byte_accuracy"],
        "bits_per_byte": text["bits_per_byte"],
        "bits_by_position": text["bits_by_position"],
        "passkey_trials": passkey["trials"],
        "passkey_by_depth": by_depth,
    }
