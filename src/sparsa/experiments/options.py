"""Command-line options of runs (shared by `sparsa train` and `sparsa sweep`) and their RunConfig."""

from __future__ import annotations

import argparse

from ..layers.scaling import SCALINGS
from .train import RunConfig
from .variants import PRESETS, VARIANTS, preset

MODEL_OPTIONS = {
    "d_model": (int, "model width"),
    "n_layers": (int, "number of transformer blocks"),
    "n_heads": (int, "attention heads"),
    "n_kv_heads": (int, "key/value heads (grouped-query attention); default n_heads"),
    "positions": (str, "nope, alibi, nape (half ALiBi, half NoPE), rope, rope+alibi or rope+nape"),
    "alibi_slopes": (str, "geometric, linear or exp (default: linear for NAPE, geometric for ALiBi)"),
    "dropout": (float, "dropout on embeddings and residual branches"),
    "backend": (str, "attention backend: auto, blocked or reference"),
}
TRAIN_OPTIONS = {
    "min_length": (int, "shortest training length (task units: symbols, context tokens, ...)"),
    "max_length": (int, "longest training length; evaluation lengths are multiples of it"),
    "steps": (int, "optimizer steps"),
    "batch_size": (int, "global batch size (split over torchrun processes)"),
    "lr": (float, "peak learning rate of AdamW"),
    "warmup_steps": (int, "linear warmup steps before the cosine decay"),
    "min_lr_ratio": (float, "final learning rate as a fraction of lr"),
    "weight_decay": (float, "AdamW weight decay"),
    "grad_clip": (float, "gradient-norm clipping"),
    "eval_every": (int, "validate (and keep the best model) every this many steps"),
    "val_length": (int, "validation length for model selection (default 2 x max_length)"),
    "val_examples": (int, "validation examples"),
    "checkpoint_every": (int, "write checkpoint.pt every this many steps"),
    "log_every": (int, "one log.jsonl line per this many steps"),
}


def add_run_options(parser: argparse.ArgumentParser, *, variant: bool = True) -> None:
    parser.add_argument("--task", default="copy", help="task name (see `sparsa tasks list`); default copy")
    parser.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a task parameter, e.g. --task-option vocab=16 (repeatable; see `sparsa tasks list`)",
    )
    if variant:
        parser.add_argument(
            "--variant",
            default="asentmax",
            choices=list(VARIANTS),
            help="attention variant; default asentmax",
        )
        parser.add_argument("--seed", type=int, default=0, help="seed of the data order and initialisation")
    parser.add_argument(
        "--preset",
        default="demo",
        choices=list(PRESETS),
        help="model size and training defaults; default demo",
    )
    model = parser.add_argument_group("model (override the preset)")
    for name, (kind, text) in MODEL_OPTIONS.items():
        model.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)
    model.add_argument("--alpha", type=float, default=None, help="entmax alpha, overriding the variant's")
    model.add_argument("--scaling", choices=[*SCALINGS, "none"], default=None, help="overrides the variant's")
    training = parser.add_argument_group("training (override the preset)")
    for name, (kind, text) in TRAIN_OPTIONS.items():
        training.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_task_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--task-option takes KEY=VALUE, got {pair!r}")
        options[key] = float(value) if any(c in value for c in ".eE") else int(value)
    return options


def run_config(args: argparse.Namespace, variant: str | None = None, seed: int | None = None) -> RunConfig:
    chosen = preset(args.preset)
    model = dict(chosen["model"])
    model.update({k: getattr(args, k) for k in MODEL_OPTIONS if getattr(args, k) is not None})
    if args.alpha is not None:
        model["alpha"] = args.alpha
    if args.scaling is not None:
        model["scaling"] = None if args.scaling == "none" else args.scaling
    train = dict(chosen["train"])
    train.update({k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None})
    return RunConfig(
        task=args.task,
        task_options=parse_task_options(args.task_option),
        variant=variant or args.variant,
        model=model,
        seed=args.seed if seed is None else seed,
        **train,
    )
