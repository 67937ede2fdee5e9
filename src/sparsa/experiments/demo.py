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
from .variants import DEMO_VARIANTS, preset

SHIPPED = Path(__file__).resolve().parent / "demo_models"
DEMO_SEED = 0
SUMMARY_EXAMPLES = 4

DEMO_STEPS = 3000
"""Twice the demo preset's steps: at 1500, ASEntmax led softmax on copy by 27 points at 8x; at 3000 by 68."""


@dataclass(frozen=True)
class DemoTask:
    """One task of the demo: its training run (seed 0, ASEntmax), test lengths and examples per length."""

    name: str
    task_options: dict
    val_length: int
    eval_every: int
    lengths: tuple[int, ...]
    examples: int

    def config(self) -> RunConfig:
        settings = preset("demo")
        settings["train"].update(steps=DEMO_STEPS)
        return RunConfig(
            task=self.name,
            task_options=dict(self.task_options),
            variant="asentmax",
            model=settings["model"],
            min_length=8,
            max_length=16,
            val_length=self.val_length,
            eval_every=self.eval_every,
            seed=DEMO_SEED,
            **settings["train"],
        )


DEMO_TASKS = (
    DemoTask("copy", {"vocab": 1024, "distinct": 1}, 64, 100, (16, 32, 64, 128, 256, 512, 1024), 100),
    DemoTask("lookup", {"vocab": 64}, 128, 250, (16, 64, 256, 1024, 4096), 50),
)


def run_demo(
    out: str | Path = "results/demo",
    *,
    retrain: bool = False,
    examples: int | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> dict[str, dict]:
    """Each demo task's results record, written with its tables and plots to ``out/<task>/``."""
    out = Path(out)
    started = time.perf_counter()
    if not retrain:
        missing = [
            f"{demo.name}/{v}"
            for demo in DEMO_TASKS
            for v in DEMO_VARIANTS
            if not (SHIPPED / demo.name / v / "model.safetensors").exists()
        ]
        if missing:
            raise FileNotFoundError(
                f"shipped demo models missing for {missing} in {SHIPPED}; run with --retrain"
            )
    records = {}
    for demo in DEMO_TASKS:
        options = {
            "lengths": list(demo.lengths),
            "examples": examples or demo.examples,
            "summary_examples": SUMMARY_EXAMPLES,
            "device": device,
            "quiet": quiet,
        }
        if retrain:
            record = sweep(
                demo.config(), list(DEMO_VARIANTS), [DEMO_SEED], out / demo.name, preset="demo", **options
            )
        else:
            models = {v: SHIPPED / demo.name / v for v in DEMO_VARIANTS}
            record = evaluate_models(models, demo.config(), DEMO_SEED, out / demo.name, **options)
        records[demo.name] = record
        if not quiet:
            print(f"\n# {demo.name}\n")
            for metric in results.METRICS:
                if any(metric in row for row in record["results"]):
                    print(f"## {results.METRICS[metric]}\n\n{results.table(record, metric)}")
    if not quiet:
        print(
            f"demo finished in {time.perf_counter() - started:.0f} s; results, tables and plots in "
            f"{out}/<task>/"
        )
    return records
