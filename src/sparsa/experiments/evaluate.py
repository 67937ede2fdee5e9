"""Accuracy at a given length: greedy decoding over the KV cache, and what the attention weights look like."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from ..attention import weight_summary
from ..models import Transformer
from ..tasks import EOS, PAD, Example, Task
from ..tasks.text import Text
from .data import collate, eval_batch_size, evaluation_examples
from .language import language_scores
from .results import ATTENTION_NAMES, HEAD_TYPE_NAMES


@torch.no_grad()
def evaluate(
    model: Transformer,
    task: Task,
    length: int,
    *,
    examples: int,
    seed: int,
    split: str = "test",
    batch_size: int = 64,
    summary_examples: int = 0,
) -> dict:
    """Exact match (%) and per-token accuracy (%) of ``examples`` examples at ``length``.

    The text task is scored by :func:`sparsa.experiments.language.language_scores`
    instead (bits per byte and passkey retrieval, on ``split``; no attention summary).

    Generative tasks: greedy decoding with the KV cache after the prompt,
    exact when the decoded tokens equal target and EOS; token accuracy is
    teacher-forced. Greedy decoding follows the target until the first
    position where the teacher-forced prediction is wrong and emits that wrong
    token there, so only the examples right under teacher forcing can be
    exact: those are decoded, the others count as wrong without decoding
    (long answers at long lengths cost one forward pass). Classification
    tasks: one forward pass; exact when every labelled token is right.
    ``summary_examples`` > 0 adds the mean largest attention weight,
    normalised entropy and support size over heads, layers and the answer
    rows of that many examples.
    """
    if examples < 1:
        raise ValueError(f"examples must be >= 1, got {examples}")
    if summary_examples < 0:
        raise ValueError(f"summary_examples must be >= 0, got {summary_examples}")
    if isinstance(task, Text):
        return language_scores(model, task, length, examples=examples, seed=seed, split=split)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    data = evaluation_examples(task, seed, split, length, examples)
    rows = eval_batch_size(len(data[0].tokens), batch_size)
    exact, correct, labelled = 0, 0, 0
    for start in range(0, len(data), rows):
        chunk = data[start : start + rows]
        batch = collate(chunk).to(device)
        mask = batch.labels >= 0
        # Logits from the first labelled column on: the last block attends from those positions only.
        kept = batch.tokens.shape[1] - int(mask.any(0).nonzero()[0]) if bool(mask.any()) else 1
        predictions = model(batch.tokens, logits_to_keep=kept).argmax(-1)
        mask, labels = mask[:, -kept:], batch.labels[:, -kept:]
        correct += int(((predictions == labels) & mask).sum())
        labelled += int(mask.sum())
        right = ((predictions == labels) | ~mask).all(-1).tolist()
        if task.kind == "classify":
            exact += sum(right)
        elif any(right):
            exact += int(
                decoded_correctly(model, [e for e, ok in zip(chunk, right, strict=True) if ok], device).sum()
            )
    result = {
        "length": length,
        "examples": len(data),
        "exact_match": 100.0 * exact / len(data),
        "token_accuracy": 100.0 * correct / max(1, labelled),
    }
    if summary_examples:
        result.update(attention_summary(model, data[:summary_examples], device))
        result["summary_examples"] = min(summary_examples, len(data))
    model.train(was_training)
    return result


def decoded_correctly(model: Transformer, examples: list[Example], device: torch.device) -> Tensor:
    """(B,) bool: greedy decoding from each prompt reproduces its answer (target and EOS)."""
    prompts = [e.tokens[: e.prompt] for e in examples]
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(examples), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = torch.from_numpy(p)
        mask[i, width - len(p) :] = 1
    answer_width = max(len(e.answer) for e in examples)
    out = model.generate(
        tokens.to(device), answer_width, attention_mask=mask.to(device), eos_token_id=EOS, pad_token_id=PAD
    )[:, width:].cpu()
    ok = torch.zeros(len(examples), dtype=torch.bool)
    for i, e in enumerate(examples):
        answer = torch.from_numpy(e.answer)
        ok[i] = out.shape[1] >= len(answer) and torch.equal(out[i, : len(answer)], answer)
    return ok


@contextmanager
def observing(model: Transformer, observer):
    layers = [block.attention for block in model.blocks]
    for layer in layers:
        layer.observer = observer
    try:
        yield
    finally:
        for layer in layers:
            layer.observer = None


def attention_summary(model: Transformer, examples: list[Example], device: torch.device) -> dict:
    """Mean largest weight, normalised entropy and support over heads and layers, on the answer rows.

    For a NAPE model also per head type (``max_weight_alibi``, ``max_weight_nope``, ...).
    """
    split = model.config.positions == "nape"
    groups = ("all", *HEAD_TYPE_NAMES) if split else ("all",)
    totals = {group: torch.zeros(3) for group in groups}
    calls = 0
    for e in examples:
        # The rows that predict an answer: from the first labelled position on (for lookup, the queries).
        first_row = int(np.flatnonzero(e.labels >= 0)[0])

        def observe(q, k, first_row=first_row, **options):
            nonlocal calls
            s = weight_summary(q, k, first_query=first_row, **options)
            per_head = torch.stack([getattr(s, metric) for metric in ATTENTION_NAMES]).cpu()
            totals["all"].add_(per_head.mean(-1))
            if split:
                alibi = options["alibi_slopes"].cpu() > 0
                totals["alibi"].add_(per_head[:, alibi].mean(-1))
                totals["nope"].add_(per_head[:, ~alibi].mean(-1))
            calls += 1

        with observing(model, observe):
            model(torch.from_numpy(e.tokens)[None].to(device))
    summary = {}
    for group, total in totals.items():
        suffix = "" if group == "all" else f"_{group}"
        means = (total / max(1, calls)).tolist()
        summary.update(
            {f"{metric}{suffix}": mean for metric, mean in zip(ATTENTION_NAMES, means, strict=True)}
        )
    return summary
