"""Sweeps: train every (variant, seed) of a run, evaluate each at every length, write results as they come."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..models import Transformer
from ..tasks import Task
from . import results
from .distributed import resolve_device
from .evaluate import evaluate
from .train import CHECKPOINT, MODEL_DIR, RUN_FILE, RunConfig, is_finished, recipe, train


def default_lengths(train_length: int, factor: int = 64) -> list[int]:
    """1x, 2x, 4x, ... up to ``factor`` times the training length."""
    lengths, n = [], train_length
    while n <= train_length * factor:
        lengths.append(n)
        n *= 2
    return lengths


def sweep(
    base: RunConfig,
    variants: list[str],
    seeds: list[int],
    out: str | Path,
    *,
    lengths: list[int] | None = None,
    examples: int = 100,
    summary_examples: int = 0,
    device: str = "auto",
    preset: str | None = None,
    quiet: bool = False,
) -> dict:
    """Train ``base`` for each variant and seed in out/runs/, evaluate, and write out/results.json.

    Resumable: finished runs are not retrained, interrupted ones continue from
    their checkpoint, and (variant, seed, length) entries already in
    results.json are kept. A folder whose results or runs were made with other
    settings (``train.recipe``) is refused, so a sweep never mixes two
    experiments or reuses a run trained another way. Returns the sweep record.
    """
    out = Path(out)
    lengths = lengths or default_lengths(base.max_length)
    path = out / "results.json"
    record = results.load(path) if path.exists() else None
    if record is None or record["task"] != base.task or record["train_length"] != base.max_length:
        record = results.new_record(
            base.task, base.task_options, base.max_length, preset, min_train_length=base.min_length
        )
    wanted = recipe(base)
    _check_recipe(record.setdefault("recipe", wanted), wanted, path)
    done = {(r["variant"], r["seed"], r["length"]) for r in record["results"]}
    main_process = int(os.environ.get("RANK", "0")) == 0
    for variant in variants:
        for seed in seeds:
            config = dataclasses.replace(base, variant=variant, seed=seed)
            run_dir = results.run_folder(out, variant, seed)
            if (run_dir / RUN_FILE).exists():
                _check_recipe(recipe(RunConfig.load(run_dir)), wanted, run_dir)
            if not is_finished(run_dir):
                train(config, run_dir, resume=(run_dir / CHECKPOINT).exists(), device=device, quiet=quiet)
            if not main_process:
                continue
            evaluate_into(
                record,
                path,
                run_dir / MODEL_DIR,
                config.make_task(),
                variant,
                seed,
                [n for n in lengths if (variant, seed, n) not in done],
                examples=examples,
                summary_examples=summary_examples,
                device=device,
                quiet=quiet,
            )
    if main_process:
        results.write(record, path)
        results.report(record, out)
    return record


def _check_recipe(saved: dict, wanted: dict, where: Path) -> None:
    """A sweep continues its own experiment only: runs or results made with other settings are refused."""
    changed = results.differing_fields(saved, wanted)
    if changed:
        raise ValueError(
            f"{where} was made with other settings than this sweep's ({', '.join(changed)} differ); "
            "sweep into a new --out, or extend single runs with sparsa train --resume"
        )


def evaluate_models(
    models: dict[str, Path],
    config: RunConfig,
    seed: int,
    out: str | Path,
    *,
    lengths: list[int],
    examples: int,
    summary_examples: int = 0,
    device: str = "auto",
    quiet: bool = False,
) -> dict:
    """Evaluate saved models (variant -> model folder) at ``lengths``; writes results.json and the report."""
    out = Path(out)
    record = results.new_record(
        config.task, config.task_options, config.max_length, min_train_length=config.min_length
    )
    for variant, folder in models.items():
        evaluate_into(
            record,
            out / "results.json",
            folder,
            config.make_task(),
            variant,
            seed,
            lengths,
            examples=examples,
            summary_examples=summary_examples,
            device=device,
            quiet=quiet,
        )
    results.report(record, out)
    return record


def evaluate_into(
    record: dict,
    path: Path | None,
    model_dir: Path,
    task: Task,
    variant: str,
    seed: int,
    lengths: list[int],
    *,
    examples: int,
    summary_examples: int,
    device: str,
    quiet: bool,
) -> None:
    """Evaluate the model in ``model_dir`` at each length; rows go to ``record``, written to ``path``."""
    model = Transformer.from_pretrained(model_dir, device=eval_device(device))
    for length in lengths:
        row = evaluate(model, task, length, examples=examples, seed=seed, summary_examples=summary_examples)
        record["results"].append({"variant": variant, "seed": seed, **row})
        if path is not None:
            results.write(record, path)
        if not quiet:
            print(result_line(variant, seed, row), flush=True)


def eval_device(device: str) -> str:
    return str(resolve_device(device))


def result_line(variant: str, seed: int, row: dict) -> str:
    text = f"{variant:>10} seed {seed} length {row['length']:>6}: exact {row['exact_match']:5.1f}%"
    text += f"  per-token {row['token_accuracy']:5.1f}%"
    if "bits_per_byte" in row:
        text += f"  bits per byte {row['bits_per_byte']:.3f}"
    if "max_weight" in row:
        text += f"  max weight {row['max_weight']:.3f}  entropy {row['entropy']:.3f}"
        text += f"  support {row['support']:.1f}"
    return text
