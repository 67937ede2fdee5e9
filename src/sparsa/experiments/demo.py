"""`sparsa demo`: softmax, SSMax, 1.5-entmax and ASEntmax (all NAPE) trained on copies of 8-16 symbols.

The task copies strings of distinct symbols (vocabulary 1024), so a model that
learns to look up where it is in the source (an induction circuit) can copy
strings of any length; what fails at long lengths is the attention. By
default the demo evaluates the models shipped in ``demo_models/`` (made by
``sparsa sweep`` with the command in ``demo_models/COMMAND``) from 1x to 64x
the training length in a few minutes; ``retrain=True`` trains them from
scratch first.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import results
from .sweep import evaluate_models, sweep
from .train import RunConfig
from .variants import DEMO_VARIANTS, preset

SHIPPED = Path(__file__).resolve().parent / "demo_models"
DEMO_SEED = 0
DEMO_LENGTHS = [16, 32, 64, 128, 256, 512, 1024]
DEMO_EXAMPLES = 100
SUMMARY_EXAMPLES = 4


DEMO_STEPS = 3000
"""Twice the demo preset's steps: at 1500, ASEntmax led softmax by 27 points at 8x; at 3000 by 68."""


def demo_config() -> RunConfig:
    settings = preset("demo")
    settings["train"].update(steps=DEMO_STEPS)
    return RunConfig(
        task="copy",
        task_options={"vocab": 1024, "distinct": 1},
        variant="asentmax",
        model=settings["model"],
        min_length=8,
        max_length=16,
        val_length=64,
        eval_every=100,
        seed=DEMO_SEED,
        **settings["train"],
    )


def run_demo(
    out: str | Path = "results/demo",
    *,
    retrain: bool = False,
    examples: int | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> dict:
    out = Path(out)
    config = demo_config()
    examples = examples or DEMO_EXAMPLES
    started = time.perf_counter()
    if retrain:
        record = sweep(
            config,
            list(DEMO_VARIANTS),
            [DEMO_SEED],
            out,
            lengths=DEMO_LENGTHS,
            examples=examples,
            summary_examples=SUMMARY_EXAMPLES,
            device=device,
            preset="demo",
            quiet=quiet,
        )
    else:
        missing = [v for v in DEMO_VARIANTS if not (SHIPPED / v / "model.safetensors").exists()]
        if missing:
            raise FileNotFoundError(
                f"shipped demo models missing for {missing} in {SHIPPED}; run with --retrain"
            )
        models = {v: SHIPPED / v for v in DEMO_VARIANTS}
        record = evaluate_models(
            models,
            config,
            DEMO_SEED,
            out,
            lengths=DEMO_LENGTHS,
            examples=examples,
            summary_examples=SUMMARY_EXAMPLES,
            device=device,
            quiet=quiet,
        )
    if not quiet:
        print()
        for metric in ("exact_match", "token_accuracy", "max_weight", "entropy", "support"):
            print(f"## {results.METRICS[metric]}\n\n{results.table(record, metric)}")
        print(f"demo finished in {time.perf_counter() - started:.0f} s; results, tables and plots in {out}/")
    return record
