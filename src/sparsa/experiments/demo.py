"""`sparsa demo`: softmax, SSMax, 1.5-entmax and ASEntmax (all NAPE) trained on 8-16 symbols, two tasks.

copy: repeat a string of distinct symbols (vocabulary 1024), 1x to 64x the
training length; a model that learns to look up where it is in the source (an
induction circuit) can copy strings of any length, so what fails at long
lengths is the attention. lookup: a context of symbols from a vocabulary of
64 (repeats allowed), then 4 symbols that occur once in it, each answered by
the symbol after it, 1x to 256x: the same lookup with a short answer, so
exact match does not compound over hundreds of tokens. By default the demo
evaluates the models shipped in ``demo_models/<task>/`` (made by ``sparsa
sweep`` with the command in ``demo_models/<task>/COMMAND``) in a few minutes;
``retrain=True`` trains them from scratch first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from . import results
from .sweep import evaluate_models, sweep
from .train import RunConfig
from .variants import DEMO_VARIANTS, LANGUAGE_VARIANTS, preset

SHIPPED = Path(__file__).resolve().parent / "demo_models"
DEMO_SEED = 0
SUMMARY_EXAMPLES = 4

DEMO_STEPS = 3000
"""Twice the demo preset's steps: at 1500, ASEntmax led softmax on copy by 27 points at 8x; at 3000 by 68."""

TEXT_EXAMPLES = 20
"""Test windows per length and passkey documents per (length, depth) of the text demo (1x-8x).

The record of docs/language-models.md has 50 of each from 1x to 16x (`sparsa sweep`, the command in
demo_models/text/COMMAND); 4096 bytes alone would take the demo past 5 minutes.
"""


@dataclass(frozen=True)
class DemoTask:
    """One task of the demo: its training runs (seed 0), test lengths and examples per length.

    ``training`` overrides the preset's training fields; the preset's model
    fields sit below each variant's (so softmax-rope keeps its RoPE).
    """

    name: str
    task_options: dict
    training: dict
    lengths: tuple[int, ...]
    examples: int
    preset: str = "demo"
    variants: tuple[str, ...] = DEMO_VARIANTS

    def config(self) -> RunConfig:
        settings = preset(self.preset)
        return RunConfig(
            task=self.name,
            task_options=dict(self.task_options),
            variant="asentmax",
            preset_model=settings["model"],
            seed=DEMO_SEED,
            **{**settings["train"], **self.training},
        )


def _synthetic(val_length: int, eval_every: int) -> dict:
    return {
        "steps": DEMO_STEPS,
        "min_length": 8,
        "max_length": 16,
        "val_length": val_length,
        "eval_every": eval_every,
    }


DEMO_TASKS = {
    "copy": DemoTask(
        "copy", {"vocab": 1024, "distinct": 1}, _synthetic(64, 100), (16, 32, 64, 128, 256, 512, 1024), 100
    ),
    "lookup": DemoTask("lookup", {"vocab": 64}, _synthetic(1024, 250), (16, 64, 256, 1024, 4096), 50),
    "text": DemoTask(
        "text",
        {"passkey_share": 0.2},
        {},
        (256, 512, 1024, 2048),
        TEXT_EXAMPLES,
        preset="lm-cpu",
        variants=LANGUAGE_VARIANTS,
    ),
}
DEFAULT_DEMO_TASKS = ("copy", "lookup")
"""`sparsa demo` without --tasks; `--tasks text` evaluates the shipped language models on their own."""


def run_demo(
    out: str | Path = "results/demo",
    *,
    tasks: tuple[str, ...] = DEFAULT_DEMO_TASKS,
    retrain: bool = False,
    examples: int | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> dict[str, dict]:
    """Each demo task's results record, written with its tables and plots to ``out/<task>/``."""
    unknown = [name for name in tasks if name not in DEMO_TASKS]
    if unknown:
        raise ValueError(f"unknown demo tasks {unknown}; known: {', '.join(DEMO_TASKS)}")
    chosen = [DEMO_TASKS[name] for name in tasks]
    out = Path(out)
    started = time.perf_counter()
    if not retrain:
        missing = [
            f"{demo.name}/{v}"
            for demo in chosen
            for v in demo.variants
            if not (SHIPPED / demo.name / v / "model.safetensors").exists()
        ]
        if missing:
            raise FileNotFoundError(
                f"shipped demo models missing for {missing} in {SHIPPED}; run with --retrain"
            )
    records = {}
    for demo in chosen:
        options = {
            "lengths": list(demo.lengths),
            "examples": examples or demo.examples,
            "summary_examples": SUMMARY_EXAMPLES,
            "device": device,
            "quiet": quiet,
        }
        variants = list(demo.variants)
        if retrain:
            record = sweep(
                demo.config(), variants, [DEMO_SEED], out / demo.name, preset=demo.preset, **options
            )
        else:
            models = {v: SHIPPED / demo.name / v for v in variants}
            record = evaluate_models(models, demo.config(), DEMO_SEED, out / demo.name, **options)
        records[demo.name] = record
        if not quiet:
            print(f"\n# {demo.name}\n")
            for metric in results.METRICS:
                if any(metric in row for row in record["results"]):
                    print(f"## {results.metric_name(record, metric)}\n\n{results.table(record, metric)}")
    if not quiet:
        print(
            f"demo finished in {time.perf_counter() - started:.0f} s; results, tables and plots in "
            f"{out}/<task>/"
        )
    return records
