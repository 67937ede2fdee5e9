"""The training loop: AdamW, warmup + cosine, clipping, exactly resumable checkpoints, DDP under torchrun."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models import Transformer, TransformerConfig
from ..models.config import from_fields
from ..tasks import IGNORE, PAD, Task, make_task
from ..tasks.base import task_parameters
from . import distributed
from .data import training_batch
from .evaluate import evaluate
from .progress import TrainingProgress
from .variants import variant_fields

CHECKPOINT = "checkpoint.pt"
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
MODEL_DIR = "model"
RESUMABLE_CHANGES = ("steps", "eval_every", "checkpoint_every", "log_every")
"""The settings a resumed run may change: more steps extend it; the others only say how often to report."""


@dataclass
class RunConfig:
    """Everything that defines a training run; two runs with equal configs train identically.

    The model's TransformerConfig fields come from ``preset_model`` (a
    preset's sizes), then the variant's (alpha, scaling, and positions for
    those that name them), then ``model`` (options given one by one); the
    vocabulary comes from the task. The validation
    split (``val_length``, default twice the longest training length) selects
    the saved model: best exact match, ties and all-zero splits broken by
    per-token accuracy. ``warmup_steps`` defaults to a tenth of ``steps``.
    """

    task: str = "copy"
    task_options: dict = field(default_factory=dict)
    variant: str = "asentmax"
    model: dict = field(default_factory=dict)
    preset_model: dict = field(default_factory=dict)
    min_length: int = 8
    max_length: int = 16
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta2: float = 0.99
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 250
    val_length: int | None = None
    val_examples: int = 64
    checkpoint_every: int = 250
    log_every: int = 10

    def __post_init__(self) -> None:
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {self.min_length}, {self.max_length}")
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "log_every", "val_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps is None:
            self.warmup_steps = self.steps // 10
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"warmup_steps must be in [0, steps), got {self.warmup_steps} with steps {self.steps}: "
                "the learning rate would never reach its peak"
            )
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        variant_fields(self.variant)
        self.task_options = task_parameters(self.task, self.task_options)
        self.make_task()

    @property
    def validation_length(self) -> int:
        return self.val_length or 2 * self.max_length

    def make_task(self) -> Task:
        return make_task(self.task, **self.task_options)

    def model_config(self) -> TransformerConfig:
        fields = {**self.preset_model, **variant_fields(self.variant), **self.model}
        if fields.get("scaling") == "log-n":
            # Log-n scaling is relative to the training context: the longest training example.
            context = len(self.make_task().example(np.random.default_rng(0), self.max_length).tokens)
            fields["scaling_options"] = {"train_length": context, **fields.get("scaling_options", {})}
        return TransformerConfig(vocab_size=self.make_task().vocab_size, **fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        return from_fields(cls, values)

    @classmethod
    def load(cls, out: str | Path) -> RunConfig:
        """The settings of the run in folder ``out``."""
        path = Path(out) / RUN_FILE
        if not path.exists():
            raise FileNotFoundError(f"no run in {out}: {RUN_FILE} is missing")
        return cls.from_dict(json.loads(path.read_text()))


class TrainingInterrupted(Exception):
    """Ctrl-C stopped a run after ``step``; its checkpoint holds ``saved_step`` (None: no checkpoint yet)."""

    def __init__(self, out: Path, step: int, saved_step: int | None) -> None:
        super().__init__(f"training in {out} stopped after step {step}")
        self.out, self.step, self.saved_step = out, step, saved_step


def learning_rate(config: RunConfig, step: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def train(
    config: RunConfig, out: str | Path, *, resume: bool = False, device: str = "auto", quiet: bool = False
) -> Path:
    """Train (or continue) the run in ``out``; returns the folder of the selected model.

    Writes run.json, log.jsonl (one line per ``log_every`` steps and per
    validation), checkpoint.pt every ``checkpoint_every`` steps and at the
    end, and the best model on validation to model/. A killed run continues
    from its checkpoint with ``resume=True`` and ends with the same weights as
    an uninterrupted one: the batch of step t and the dropout noise depend
    only on (seed, t); log.jsonl drops the lines of steps after the
    checkpoint, which run again. A resumed run may change only
    RESUMABLE_CHANGES; more ``steps`` extend a finished run (its cosine
    schedule is stretched to the new last step). Ctrl-C in a single process
    stops after the running step, writes a checkpoint there and raises
    TrainingInterrupted (a second Ctrl-C stops at once, from the last
    checkpoint); under torchrun training stops at once. Under torchrun every
    process takes its slice of the same global batch.
    """
    out = Path(out)
    cluster = distributed.start(device)
    try:
        return _train(config, out, resume, cluster, quiet)
    finally:
        distributed.stop(cluster)


def trained_steps(out: str | Path) -> int:
    """The step the checkpoint of the run in ``out`` holds; 0 without one."""
    path = Path(out) / CHECKPOINT
    if not path.exists():
        return 0
    return torch.load(path, weights_only=True, map_location="cpu")["step"]


def is_finished(out: str | Path) -> bool:
    """Whether the run in ``out`` reached its last step."""
    out = Path(out)
    return (out / RUN_FILE).exists() and trained_steps(out) >= RunConfig.load(out).steps


NOT_RECIPE = ("variant", "seed", "checkpoint_every", "log_every")
"""RunConfig fields that runs of one experiment may differ in: what is compared, and how often it reports."""


def recipe(config: RunConfig) -> dict:
    """The settings that every run of one experiment (a sweep, or sweeps merged) shares."""
    return {k: v for k, v in config.to_dict().items() if k not in NOT_RECIPE}


def unresumable_changes(saved: RunConfig, config: RunConfig) -> list[str]:
    """The settings of ``config`` that differ from the run's ``saved`` ones and a resume may not change."""
    before = saved.to_dict()
    return [k for k, v in config.to_dict().items() if before[k] != v and k not in RESUMABLE_CHANGES]


def _drop_log_after(path: Path, step: int) -> None:
    """Keep the log lines up to ``step``: the resumed run writes the later ones again."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    partial = path.with_suffix(".tmp")
    partial.write_text("".join(kept))
    os.replace(partial, path)


@contextlib.contextmanager
def _stop_requests(enabled: bool):
    """Turn the first Ctrl-C into a request to stop after the running step; the second stops at once."""
    requested: list[bool] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def request(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(True)

    previous = signal.signal(signal.SIGINT, request)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


def _train(config: RunConfig, out: Path, resume: bool, cluster: distributed.Cluster, quiet: bool) -> Path:
    task = config.make_task()
    checkpoint_path = out / CHECKPOINT
    if checkpoint_path.exists() and not resume:
        raise FileExistsError(
            f"{out} holds a run already: continue it with resume (--resume), or choose another out"
        )
    if resume and (out / RUN_FILE).exists():
        changed = unresumable_changes(RunConfig.load(out), config)
        if changed:
            raise ValueError(
                f"resume needs the run's own settings; these differ from {out / RUN_FILE}: {changed}"
            )

    torch.manual_seed(config.seed)
    model = Transformer(config.model_config()).to(cluster.device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, config.beta2), weight_decay=config.weight_decay
    )
    start_step, best, saved_step = 0, None, None
    if resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=cluster.device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, best = state["step"], state["best"]
        saved_step = start_step
        if config.steps < start_step:
            raise ValueError(
                f"{out} has trained {start_step} steps already; steps must be at least {start_step}"
            )
    if cluster.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if resume:
            _drop_log_after(out / LOG_FILE, start_step)
    trained = cluster.wrap(model)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cluster.device.type == "cuda"
        else contextlib.nullcontext()
    )
    rows = cluster.shard(config.batch_size)
    progress = TrainingProgress(config.steps, start_step, enabled=cluster.is_main and not quiet)
    window = _Window()
    done = start_step
    log_file = open(out / LOG_FILE, "a") if cluster.is_main else contextlib.nullcontext()  # noqa: SIM115
    try:
        with progress, log_file as log, _stop_requests(cluster.world_size == 1) as stop:
            for step in range(start_step, config.steps):
                started = time.perf_counter()
                torch.manual_seed(config.seed * 1_000_003 + step * 101 + cluster.rank)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(config, step)
                lengths = (config.min_length, config.max_length)
                batch = training_batch(task, config.seed, step, config.batch_size, lengths)
                targets = int((batch.labels != IGNORE).sum())
                mine = batch.rows(*rows).to(cluster.device)
                with autocast:
                    logits = trained(mine.tokens)
                loss_sum = F.cross_entropy(
                    logits.float().flatten(0, 1), mine.labels.flatten(), ignore_index=IGNORE, reduction="sum"
                )
                # DDP averages gradients over processes: scale so the result is the global mean over targets.
                (loss_sum * cluster.world_size / targets).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                window.add(
                    logits.detach(),
                    mine,
                    loss_sum.detach(),
                    cluster.world_size,
                    time.perf_counter() - started,
                )
                done = step + 1
                if done % config.log_every == 0 or done == config.steps:
                    record = {"step": done, "lr": learning_rate(config, step), **window.summary()}
                    progress.update(done, record)
                    if log is not None:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    window = _Window()
                if done % config.eval_every == 0 or done == config.steps:
                    best = _validate(config, model, task, out, cluster, done, best, log)
                if done % config.checkpoint_every == 0 or done == config.steps or stop:
                    _save_checkpoint(checkpoint_path, model, optimizer, done, best, cluster)
                    saved_step = done
                if stop and done < config.steps:
                    raise TrainingInterrupted(out, done, saved_step)
    except KeyboardInterrupt:
        raise TrainingInterrupted(out, done, saved_step) from None
    return out / MODEL_DIR


class _Window:
    """Loss, accuracy and throughput of this process's rows over the steps since the last log line."""

    def __init__(self) -> None:
        self.loss, self.correct, self.targets, self.tokens, self.steps, self.seconds = 0.0, 0, 0, 0, 0, 0.0

    def add(self, logits, batch, loss_sum, world_size: int, seconds: float) -> None:
        labelled = batch.labels != IGNORE
        self.loss += float(loss_sum) / max(1, int(labelled.sum()))
        self.correct += int(((logits.argmax(-1) == batch.labels) & labelled).sum())
        self.targets += int(labelled.sum())
        self.tokens += int((batch.tokens != PAD).sum()) * world_size
        self.steps += 1
        self.seconds += seconds

    def summary(self) -> dict:
        return {
            "loss": self.loss / max(1, self.steps),
            "token_accuracy": 100.0 * self.correct / max(1, self.targets),
            "tokens_per_second": self.tokens / max(self.seconds, 1e-9),
        }


def _validate(config, model, task, out, cluster, step, best, log):
    if cluster.is_main:
        result = evaluate(
            model,
            task,
            config.validation_length,
            examples=config.val_examples,
            seed=config.seed,
            split="validation",
        )
        score = [result["exact_match"], result["token_accuracy"]]
        if best is None or score > best:
            best = score
            model.save_pretrained(out / MODEL_DIR)
            (out / MODEL_DIR / "selection.json").write_text(
                json.dumps({"step": step, **result}, indent=2) + "\n"
            )
        if log is not None:
            log.write(json.dumps({"step": step, "validation": result}) + "\n")
            log.flush()
    cluster.barrier()
    return best


def _save_checkpoint(path: Path, model, optimizer, step: int, best, cluster) -> None:
    if cluster.is_main:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "best": best}
        partial = path.with_suffix(".tmp")
        torch.save(state, partial)
        os.replace(partial, path)
    cluster.barrier()
