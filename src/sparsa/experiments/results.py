"""Sweep results: one JSON file per sweep, Markdown tables and a PNG plot of accuracy against length."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

METRICS = {
    "exact_match": "exact match (%)",
    "token_accuracy": "per-token accuracy (%)",
    "max_weight": "largest attention weight",
    "entropy": "normalised attention entropy",
    "support": "attention support size (keys)",
}


def new_record(task: str, task_options: dict, train_length: int, preset: str | None = None) -> dict:
    return {
        "task": task,
        "task_options": task_options,
        "train_length": train_length,
        "preset": preset,
        "results": [],
    }


def write(record: dict, path: str | Path) -> Path:
    """Write atomically, so an interrupted sweep leaves the previous complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(path)
    return path


def load(path: str | Path) -> dict:
    record = json.loads(Path(path).read_text())
    for key in ("task", "train_length", "results"):
        if key not in record:
            raise ValueError(f"{path} is not a sparsa sweep result (no {key!r})")
    return record


def _means(record: dict, metric: str) -> tuple[list[str], list[int], dict]:
    values = defaultdict(list)
    variants, lengths = [], []
    for row in record["results"]:
        if metric not in row:
            continue
        if row["variant"] not in variants:
            variants.append(row["variant"])
        if row["length"] not in lengths:
            lengths.append(row["length"])
        values[row["variant"], row["length"]].append(row[metric])
    means = {key: sum(v) / len(v) for key, v in values.items()}
    return variants, sorted(lengths), means


def table(record: dict, metric: str = "exact_match") -> str:
    """Variants x lengths, the mean over seeds; the header gives each length as a multiple of training."""
    variants, lengths, means = _means(record, metric)
    train = record["train_length"]
    header = "| variant | " + " | ".join(f"{n} ({n / train:g}x)" for n in lengths) + " |"
    lines = [header, "|---" * (len(lengths) + 1) + "|"]
    digits = 1 if metric in ("exact_match", "token_accuracy", "support") else 3
    for variant in variants:
        cells = [f"{means[variant, n]:.{digits}f}" if (variant, n) in means else "" for n in lengths]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    seeds = sorted({row["seed"] for row in record["results"]})
    return "\n".join(lines) + f"\n\n{METRICS[metric]}, mean over seeds {seeds}.\n"


def plot(record: dict, path: str | Path, metric: str = "exact_match") -> Path:
    """Accuracy (or another metric) against length on a log axis, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants, lengths, means = _means(record, metric)
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for variant in variants:
        xs = [n for n in lengths if (variant, n) in means]
        axes.plot(xs, [means[variant, n] for n in xs], marker="o", label=variant)
        for row in record["results"]:
            if row["variant"] == variant and metric in row:
                axes.scatter(row["length"], row[metric], s=8, alpha=0.3, color=axes.lines[-1].get_color())
    axes.set_xscale("log", base=2)
    axes.axvline(record["train_length"], color="grey", linestyle=":", label="training length")
    axes.set_xlabel("evaluation length (tokens of the task)")
    axes.set_ylabel(METRICS[metric])
    axes.set_title(f"{record['task']}: trained up to length {record['train_length']}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def report(record: dict, out: str | Path) -> list[Path]:
    """table.md (every metric present) and one PNG per metric in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    present = [m for m in METRICS if any(m in row for row in record["results"])]
    sections = [f"# {record['task']} (trained up to length {record['train_length']})\n"]
    sections += [f"## {METRICS[m]}\n\n{table(record, m)}" for m in present]
    written = [out / "table.md"]
    written[0].write_text("\n".join(sections))
    written += [plot(record, out / f"{m}.png", m) for m in present]
    return written
