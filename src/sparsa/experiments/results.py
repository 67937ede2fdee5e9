"""Sweep results: one JSON file per sweep, Markdown tables and a PNG plot of accuracy against length."""

from __future__ import annotations

import json
import textwrap
from collections import defaultdict
from pathlib import Path

from ..tasks import make_task
from ..tasks.text import Text, load_corpus

ATTENTION_NAMES = {
    "max_weight": "largest attention weight",
    "entropy": "normalised attention entropy",
    "support": "attention support size (keys)",
}
"""The attention statistics (fields of WeightSummary), in the order evaluate() computes them."""
HEAD_TYPE_NAMES = {"alibi": "ALiBi heads", "nope": "NoPE heads"}
"""The head types of a NAPE model, summarised apart (metric names get the key as suffix)."""

METRICS = {
    "exact_match": "exact match (%)",
    "token_accuracy": "per-token accuracy (%)",
    "bits_per_byte": "bits per byte (text)",
    **ATTENTION_NAMES,
    **{
        f"{metric}_{heads}": f"{name}, {heads_name}"
        for heads, heads_name in HEAD_TYPE_NAMES.items()
        for metric, name in ATTENTION_NAMES.items()
    },
}


TEXT_METRIC_NAMES = {
    "exact_match": "passkey exact match (%, mean over depths)",
    "token_accuracy": "next-byte accuracy (%)",
    "bits_per_byte": "bits per byte",
}
"""What exact match and per-token accuracy are on the text task (language.language_scores)."""


def metric_name(record: dict, metric: str) -> str:
    if record["task"] == "text" and metric in TEXT_METRIC_NAMES:
        return TEXT_METRIC_NAMES[metric]
    return METRICS[metric]


def new_record(
    task: str, task_options: dict, train_length: int, preset: str | None = None, *, min_train_length: int
) -> dict:
    """An empty record; training covered lengths min_train_length..train_length.

    A text task's record also names its corpus (``Corpus.fingerprint``), so a
    reader knows which text the scores are on.
    """
    record = {
        "task": task,
        "task_options": task_options,
        "train_length": train_length,
        "min_train_length": min_train_length,
        "preset": preset,
    }
    made = make_task(task, **task_options)
    if isinstance(made, Text):
        record["corpus"] = load_corpus(made.corpus).fingerprint()
    return {**record, "results": []}


def write(record: dict, path: str | Path) -> Path:
    """Write atomically, so an interrupted sweep leaves the previous complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(path)
    return path


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results file {path}")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not a sparsa sweep result (not JSON)") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a sparsa sweep result (not a JSON object)")
    for key in ("task", "train_length", "results"):
        if key not in record:
            raise ValueError(f"{path} is not a sparsa sweep result (no {key!r})")
    return record


EXPERIMENT_KEYS = ("task", "task_options", "train_length", "min_train_length", "preset", "corpus", "recipe")
"""What makes two records the same experiment: rows of records that agree on these can stand side by side.

``recipe`` (written by sweeps) is every training and model setting the runs share (train.recipe).
"""


def differing_fields(first: dict, second: dict) -> list[str]:
    return [k for k in sorted(set(first) | set(second)) if first.get(k) != second.get(k)]


def merge(records: list[dict], names: list[str]) -> dict:
    """One record from sweeps of one experiment run apart (other processes, machines or sessions).

    ``names`` (one per record, e.g. its path) go into the errors: records
    that differ in an ``EXPERIMENT_KEYS`` field, or that both hold a
    (variant, seed, length), are refused rather than mixed.
    """
    first, first_name = records[0], names[0]
    merged = {key: first[key] for key in EXPERIMENT_KEYS if key in first}
    merged["results"] = []
    owner = {}
    for record, name in zip(records, names, strict=True):
        for key in EXPERIMENT_KEYS:
            if record.get(key) == first.get(key):
                continue
            if key == "recipe" and None not in (record.get(key), first.get(key)):
                differs = f"its settings differ: {', '.join(differing_fields(record[key], first[key]))}"
            else:
                differs = f"{key} differs ({record.get(key)!r} against {first.get(key)!r})"
            raise ValueError(f"cannot merge {name} with {first_name}: {differs}")
        for row in record["results"]:
            cell = (row["variant"], row["seed"], row["length"])
            if cell in owner:
                raise ValueError(
                    f"cannot merge {name} with {owner[cell]}: both hold variant {cell[0]} seed {cell[1]} "
                    f"length {cell[2]}"
                )
            owner[cell] = name
            merged["results"].append(row)
    return merged


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


def seeds_by_variant(record: dict, metric: str) -> dict[str, list[int]]:
    seeds = defaultdict(set)
    for row in record["results"]:
        if metric in row:
            seeds[row["variant"]].add(row["seed"])
    return {variant: sorted(s) for variant, s in seeds.items()}


def uneven(seeds: dict[str, list[int]]) -> bool:
    """Whether the variants of a ``seeds_by_variant`` mapping have different seeds."""
    return len({tuple(s) for s in seeds.values()}) > 1


def variant_names(record: dict, metric: str) -> dict[str, str]:
    """Each variant's name in a table or legend, with its seed count if the variants' seeds differ."""
    seeds = seeds_by_variant(record, metric)
    if not uneven(seeds):
        return {variant: variant for variant in seeds}
    return {v: f"{v} ({len(s)} seed{'s' if len(s) != 1 else ''})" for v, s in seeds.items()}


def table(record: dict, metric: str = "exact_match") -> str:
    """Variants x lengths, the mean over seeds; the header gives each length as a multiple of training."""
    variants, lengths, means = _means(record, metric)
    train = record["train_length"]
    header = "| variant | " + " | ".join(f"{n} ({n / train:g}x)" for n in lengths) + " |"
    lines = [header, "|---" * (len(lengths) + 1) + "|"]
    digits = 1 if metric in ("exact_match", "token_accuracy") or metric in LOG_SCALE_METRICS else 3
    names = variant_names(record, metric)
    for variant in variants:
        cells = [f"{means[variant, n]:.{digits}f}" if (variant, n) in means else "" for n in lengths]
        lines.append(f"| {names[variant]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{metric_name(record, metric)}: {sample_note(record, metric)}.\n"


LOG_SCALE_METRICS = tuple(m for m in METRICS if m.startswith("support"))
"""Metrics that span orders of magnitude over the lengths; a linear axis would hide the small values."""

ATTENTION_METRICS = tuple(m for m in METRICS if m not in ("exact_match", "token_accuracy", "bits_per_byte"))
"""Measured on the answer rows of ``summary_examples`` examples per length, not on every test example."""


MARKERS = "osD^vP*X"
LINE_STYLES = ("-", "--", "-.", ":")
"""Each variant gets its own marker and dash, so a line drawn under another stays visible."""


def training_lengths(record: dict) -> tuple[int, int]:
    """The shortest and longest training length (records written before the range give the longest twice)."""
    return record.get("min_train_length") or record["train_length"], record["train_length"]


def trained_on(record: dict) -> str:
    """The training lengths in words: "lengths 8-16", or "length 16" for a single one."""
    shortest, longest = training_lengths(record)
    return f"lengths {shortest}-{longest}" if shortest < longest else f"length {longest}"


def sample_note(record: dict, metric: str) -> str:
    """How many seeds and examples stand behind each point of ``metric``, for a figure or a table."""
    rows = [row for row in record["results"] if metric in row]
    seeds = sorted({row["seed"] for row in rows})
    key = "summary_examples" if metric in ATTENTION_METRICS else "examples"
    what = "examples (their answer rows, over layers and heads)" if key == "summary_examples" else "examples"
    if record["task"] == "text":
        key, what = (
            ("passkey_trials", "passkey documents per depth")
            if metric == "exact_match"
            else (
                "examples",
                "test windows",
            )
        )
    counts = sorted({row[key] for row in rows if key in row})
    examples = "/".join(str(c) for c in counts) or "?"
    seed_text = f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})"
    mean = "mean of " if len(seeds) > 1 else ""
    per_variant = seeds_by_variant(record, metric)
    if uneven(per_variant):
        seed_counts = sorted({len(s) for s in per_variant.values()})
        seed_text = (
            f"{seed_counts[0]}-{seed_counts[-1]} seeds per variant (of {', '.join(map(str, seeds))}; "
            "each variant's count beside its name)"
        )
        mean = "mean of "
    return f"{mean}{seed_text}, {examples} {what} per length and seed"


def plot(record: dict, path: str | Path, metric: str = "exact_match") -> Path:
    """``metric`` against length on a log axis: one line per variant (mean over seeds), a dot per seed.

    The legend sits outside the axes so it covers no curve; the shaded band
    is the range of training lengths; the subtitle says how many seeds and
    examples each point is.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants, lengths, means = _means(record, metric)
    names = variant_names(record, metric)
    # The legend sits beside the axes; past about a dozen entries the figure grows to hold it.
    figure, axes = plt.subplots(figsize=(8.0, max(4.4, 1.2 + 0.25 * (len(variants) + 2))))
    # Past ten variants the default colours repeat; tab20's twenty keep every line its own colour.
    colors = plt.get_cmap("tab20").colors if len(variants) > 10 else [None] * len(variants)
    for index, variant in enumerate(variants):
        xs = [n for n in lengths if (variant, n) in means]
        (line,) = axes.plot(
            xs,
            [means[variant, n] for n in xs],
            color=colors[index % len(colors)],
            marker=MARKERS[index % len(MARKERS)],
            linestyle=LINE_STYLES[index % len(LINE_STYLES)],
            markerfacecolor="none" if index % 2 else None,
            label=names[variant],
        )
        seeds = [row for row in record["results"] if row["variant"] == variant and metric in row]
        axes.scatter(
            [row["length"] for row in seeds],
            [row[metric] for row in seeds],
            s=10,
            alpha=0.35,
            color=line.get_color(),
        )
    if len({row["seed"] for row in record["results"]}) > 1:
        axes.scatter([], [], s=10, alpha=0.35, color="black", label="one seed")
    shortest, longest = training_lengths(record)
    label = f"training {trained_on(record)}"
    if shortest < longest:
        axes.axvspan(shortest, longest, color="grey", alpha=0.2, label=label)
    else:
        axes.axvline(longest, color="grey", linestyle=":", label=label)
    axes.set_xscale("log", base=2)
    if metric in LOG_SCALE_METRICS:
        axes.set_yscale("log")
    unit = (
        "context (bytes"
        if record["task"] == "text"
        else "evaluation length (the task's length: symbols, pairs, ..."
    )
    axes.set_xlabel(f"{unit}; log scale)")
    axes.set_ylabel(metric_name(record, metric))
    figure.suptitle(f"{record['task']}: {metric_name(record, metric)} against length", fontsize=11)
    axes.set_title(textwrap.fill(sample_note(record, metric), 90), fontsize=8.5, color="dimgrey")
    axes.grid(alpha=0.3, which="both")
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def passkey_heatmap(record: dict, path: str | Path) -> Path:
    """Passkey exact match by length (columns) and depth (rows), one panel per variant, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in record["results"] if "passkey_by_depth" in row]
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    lengths = sorted({row["length"] for row in rows})
    depths = sorted({depth for row in rows for depth in row["passkey_by_depth"]}, key=float)
    figure, panels = plt.subplots(1, len(variants), figsize=(2.2 + 1.1 * len(lengths) * len(variants), 3.6))
    panels = [panels] if len(variants) == 1 else list(panels)
    for axes, variant in zip(panels, variants, strict=True):
        grid = [[_mean_at(rows, variant, n, depth) for n in lengths] for depth in depths]
        image = axes.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                axes.text(
                    j, i, "" if value is None else f"{value:.0f}", ha="center", va="center", color="white"
                )
        axes.set_xticks(range(len(lengths)), [f"{n}\n({n / record['train_length']:g}x)" for n in lengths])
        axes.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
        axes.set_xlabel("document length (bytes)")
        axes.set_title(variant, fontsize=10)
    panels[0].set_ylabel("depth of the key")
    figure.colorbar(image, ax=panels, label="passkey exact match (%)")
    trials = sorted({row["passkey_trials"] for row in rows})
    seeds = sorted({row["seed"] for row in rows})
    figure.suptitle(
        f"passkey retrieval: {'/'.join(map(str, trials))} documents per cell and seed, "
        f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})",
        fontsize=10,
    )
    path = Path(path)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def _mean_at(rows: list[dict], variant: str, length: int, depth: str) -> float | None:
    values = [r["passkey_by_depth"][depth] for r in rows if r["variant"] == variant and r["length"] == length]
    return sum(values) / len(values) if values else None


def bits_by_position_plot(record: dict, path: str | Path) -> Path:
    """Bits per byte against the position in the window, at the longest length, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in record["results"] if "bits_by_position" in row]
    longest = max(row["length"] for row in rows)
    figure, axes = plt.subplots(figsize=(8.0, 4.4))
    for index, variant in enumerate(dict.fromkeys(row["variant"] for row in rows)):
        curves = [
            row["bits_by_position"] for row in rows if row["variant"] == variant and row["length"] == longest
        ]
        mean = [sum(values) / len(values) for values in zip(*curves, strict=True)]
        bucket = max(1, longest // 64)
        xs = list(range(bucket, longest + 1, bucket))
        ys = [sum(mean[x - bucket : x]) / bucket for x in xs]
        axes.plot(xs, ys, linestyle=LINE_STYLES[index % len(LINE_STYLES)], label=variant)
    axes.axvline(record["train_length"], color="grey", linestyle=":", label=f"training {trained_on(record)}")
    axes.set_xscale("log", base=2)
    axes.set_xlabel(f"position in a window of {longest} bytes (mean over buckets of {max(1, longest // 64)})")
    axes.set_ylabel("bits per byte")
    figure.suptitle(f"{record['task']}: loss by position", fontsize=11)
    axes.set_title(textwrap.fill(sample_note(record, "bits_per_byte"), 90), fontsize=8.5, color="dimgrey")
    axes.grid(alpha=0.3, which="both")
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def validation_history(run_dir: str | Path) -> list[dict]:
    """A run's validation results in step order, each with its ``step`` (from the run's log.jsonl)."""
    from .train import LOG_FILE  # train imports evaluate, which imports this module

    log = Path(run_dir) / LOG_FILE
    lines = log.read_text().splitlines() if log.exists() else []
    entries = [json.loads(line) for line in lines if line.strip()]
    return [{"step": e["step"], **e["validation"]} for e in entries if "validation" in e]


def learning_curves_plot(record: dict, runs: dict[str, Path], path: str | Path) -> Path:
    """Each run's validation metrics against its training steps: one panel per metric, one line per run.

    ``runs`` maps a label to its run folder (``record_runs``).
    Text runs show passkey exact match and bits per byte, the others exact
    match and per-token accuracy; the subtitle gives the validation length
    and examples each point is.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {label: validation_history(folder) for label, folder in runs.items()}
    metrics = ["exact_match", "bits_per_byte" if record["task"] == "text" else "token_accuracy"]
    figure, panels = plt.subplots(1, len(metrics), figsize=(11.0, 4.4))
    for axes, metric in zip(panels, metrics, strict=True):
        for index, (label, history) in enumerate(histories.items()):
            points = [(h["step"], h[metric]) for h in history if metric in h]
            axes.plot(
                [s for s, _ in points],
                [v for _, v in points],
                marker=MARKERS[index % len(MARKERS)],
                linestyle=LINE_STYLES[index % len(LINE_STYLES)],
                label=label,
            )
        axes.set_xlabel("training step")
        axes.set_ylabel(metric_name(record, metric))
        axes.grid(alpha=0.3)
    first = next(iter(histories.values()))[0]
    figure.suptitle(
        f"{record['task']}: validation during training, at length {first['length']} "
        f"({first['length'] / record['train_length']:g}x the training length), "
        f"{first['examples']} examples per point, one run per line",
        fontsize=10,
    )
    panels[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def corpus_line(fingerprint: dict) -> str:
    python = f", Python {fingerprint['python']}" if "python" in fingerprint else ""
    return (
        f"{fingerprint['source']}{python}, {fingerprint['files']} files, {fingerprint['bytes']:,} bytes, "
        f"sha256 {fingerprint['sha256'][:16]}"
    )


def run_folder(sweep_folder: str | Path, variant: str, seed: int) -> Path:
    """Where a sweep trains (variant, seed)."""
    return Path(sweep_folder) / "runs" / f"{variant}-seed{seed}"


def record_runs(record: dict, sweep_folder: str | Path) -> dict[str, Path]:
    """The run folders of ``record``'s (variant, seed) pairs that ``sweep_folder`` holds, by folder name."""
    pairs = dict.fromkeys((row["variant"], row["seed"]) for row in record["results"])
    found = [run_folder(sweep_folder, variant, seed) for variant, seed in pairs]
    return {run.name: run for run in found if validation_history(run)}


def report(record: dict, out: str | Path, runs_folder: str | Path | None = None) -> list[Path]:
    """table.md (every metric present), a PNG per metric in ``out``; text adds passkey and position plots.

    Where ``runs_folder`` (default ``out``) holds the record's runs (a sweep's
    runs/), learning_curves.png shows their validation against steps.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    present = [m for m in METRICS if any(m in row for row in record["results"])]
    sections = [f"# {record['task']} (trained on {trained_on(record)})\n"]
    if "corpus" in record:
        sections.append(f"Corpus: {corpus_line(record['corpus'])}\n")
    sections += [f"## {metric_name(record, m)}\n\n{table(record, m)}" for m in present]
    written = [out / "table.md"]
    written[0].write_text("\n".join(sections))
    written += [plot(record, out / f"{m}.png", m) for m in present]
    if any("passkey_by_depth" in row for row in record["results"]):
        written.append(passkey_heatmap(record, out / "passkey.png"))
    if any("bits_by_position" in row for row in record["results"]):
        written.append(bits_by_position_plot(record, out / "bits_by_position.png"))
    runs = record_runs(record, out if runs_folder is None else runs_folder)
    if runs:
        written.append(learning_curves_plot(record, runs, out / "learning_curves.png"))
    return written
