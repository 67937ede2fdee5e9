"""Command-line options of runs (shared by `sparsa train` and `sparsa sweep`) and their RunConfig."""

from __future__ import annotations

import argparse
import dataclasses

from ..layers.scaling import SCALINGS
from .train import RunConfig, unresumable_changes
from .variants import PRESETS, VARIANTS, preset

MODEL_OPTIONS = {
    "d_model": (int, "model width"),
    "n_layers": (int, "number of transformer blocks"),
    "n_heads": (int, "attention heads"),
    "n_kv_heads": (int, "key/value heads (grouped-query attention); default n_heads"),
    "positions": (str, "nope, alibi, nape (half ALiBi, half NoPE), rope, rope+alibi or rope+nape"),
    "alibi_slopes": (str, "geometric, linear or exp (default: linear for NAPE, geometric for ALiBi)"),
    "window": (int, "a causal sliding window of this many tokens in every layer (default: none)"),
    "dropout": (float, "dropout on embeddings and residual branches"),
    "backend": (str, "attention backend: auto, blocked or reference"),
}
TRAIN_OPTIONS = {
    "min_length": (int, "shortest training length (task units: symbols, context tokens, ...)"),
    "max_length": (int, "longest training length; evaluation lengths are multiples of it"),
    "steps": (int, "optimizer steps"),
    "batch_size": (int, "global batch size (split over torchrun processes)"),
    "lr": (float, "peak learning rate of AdamW"),
    "warmup_steps": (int, "linear warmup steps before the cosine decay (default: a tenth of the steps)"),
    "min_lr_ratio": (float, "final learning rate as a fraction of lr"),
    "weight_decay": (float, "AdamW weight decay"),
    "grad_clip": (float, "gradient-norm clipping"),
    "eval_every": (int, "validate (and keep the best model) every this many steps"),
    "val_length": (int, "validation length for model selection (default 2 x max_length)"),
    "val_examples": (int, "validation examples"),
    "checkpoint_every": (int, "write checkpoint.pt every this many steps"),
    "log_every": (int, "one log.jsonl line per this many steps"),
}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def _option_type(kind: type, name: str):
    if kind is not int:
        return kind
    return non_negative_int if name == "warmup_steps" else positive_int


def add_run_options(parser: argparse.ArgumentParser, *, variant: bool = True) -> None:
    """The options of a run; every one defaults to None, so a resumed run knows which were typed."""
    parser.add_argument("--task", default=None, help="task name (see `sparsa tasks list`); default copy")
    parser.add_argument(
        "--task-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a task parameter, e.g. --task-option vocab=16 (repeatable; see `sparsa tasks list`)",
    )
    if variant:
        parser.add_argument(
            "--variant",
            default=None,
            choices=list(VARIANTS),
            help="attention variant; default asentmax",
        )
        parser.add_argument(
            "--seed", type=int, default=None, help="seed of the data order and initialisation; default 0"
        )
    parser.add_argument(
        "--preset",
        default=None,
        choices=list(PRESETS),
        help="model size and training defaults; default demo",
    )
    model = parser.add_argument_group("model (override the preset)")
    for name, (kind, text) in MODEL_OPTIONS.items():
        model.add_argument(
            "--" + name.replace("_", "-"), type=_option_type(kind, name), default=None, help=text
        )
    model.add_argument("--alpha", type=float, default=None, help="entmax alpha, overriding the variant's")
    model.add_argument("--scaling", choices=[*SCALINGS, "none"], default=None, help="overrides the variant's")
    model.add_argument(
        "--row-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="an option of the variant's row map, e.g. --row-option k=16 for topk-softmax (repeatable; "
        "see docs/mathematics.md, section 7)",
    )
    training = parser.add_argument_group("training (override the preset)")
    for name, (kind, text) in TRAIN_OPTIONS.items():
        training.add_argument(
            "--" + name.replace("_", "-"), type=_option_type(kind, name), default=None, help=text
        )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_key_values(pairs: list[str] | None, flag: str) -> dict[str, str]:
    """KEY=VALUE pairs of a repeatable option ``flag``, as text."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{flag} takes KEY=VALUE, got {pair!r}")
        options[key] = value
    return options


def parse_task_options(pairs: list[str] | None) -> dict[str, str]:
    """--task-option pairs as text; the task casts each value to its parameter's type."""
    return parse_key_values(pairs, "--task-option")


def parse_row_options(pairs: list[str]) -> dict[str, float]:
    """KEY=VALUE pairs of a row map's options; every row map option is a number."""
    options = {}
    for key, value in parse_key_values(pairs, "--row-option").items():
        try:
            options[key] = float(value)
        except ValueError:
            raise ValueError(f"--row-option {key} takes a number, got {value!r}") from None
    return options


def run_config(args: argparse.Namespace, variant: str | None = None, seed: int | None = None) -> RunConfig:
    """A new run from the command line: the preset, then every option given."""
    chosen = preset(args.preset or "demo")
    return RunConfig(
        task=args.task or "copy",
        task_options=parse_task_options(args.task_option),
        variant=variant or getattr(args, "variant", None) or "asentmax",
        model=_model_options(args),
        preset_model=chosen["model"],
        seed=next(s for s in (seed, getattr(args, "seed", None), 0) if s is not None),
        **{**chosen["train"], **_train_options(args)},
    )


def resumed_config(args: argparse.Namespace, saved: RunConfig) -> RunConfig:
    """The saved run with the options typed now; only train.RESUMABLE_CHANGES may differ from it."""
    typed = _train_options(args)
    if args.preset is not None:
        chosen = preset(args.preset)
        typed = {**chosen["train"], **typed, "preset_model": chosen["model"]}
    if args.task is not None:
        typed["task"] = args.task
    if args.task_option is not None:
        typed["task_options"] = parse_task_options(args.task_option)
    for name in ("variant", "seed"):
        if getattr(args, name, None) is not None:
            typed[name] = getattr(args, name)
    model = _model_options(args)
    if model:
        typed["model"] = {**saved.model, **model}
    config = dataclasses.replace(saved, **typed)
    changed = unresumable_changes(saved, config)
    if changed:
        raise ValueError(
            f"--resume continues a run as it was set up; these options differ from the run's: {changed}; "
            f"leave them out (the run folder holds them) or train into a new --out"
        )
    return config


def _model_options(args: argparse.Namespace) -> dict:
    model = {k: getattr(args, k) for k in MODEL_OPTIONS if getattr(args, k) is not None}
    if args.alpha is not None:
        model["alpha"] = args.alpha
    if args.scaling is not None:
        model["scaling"] = None if args.scaling == "none" else args.scaling
    if args.row_option is not None:
        model["row_options"] = parse_row_options(args.row_option)
    return model


def _train_options(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None}
