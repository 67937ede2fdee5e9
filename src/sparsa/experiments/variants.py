"""Attention variants and model-size presets, by name."""

from __future__ import annotations

VARIANTS: dict[str, dict] = {
    "softmax": {"alpha": 1.0, "scaling": None},
    "ssmax": {"alpha": 1.0, "scaling": "ssmax"},
    "entmax": {"alpha": 1.5, "scaling": None},
    "asentmax": {"alpha": 1.5, "scaling": "asentmax"},
    "asentmax-static": {"alpha": 1.5, "scaling": "asentmax-static"},
    "sparsemax": {"alpha": 2.0, "scaling": None},
    "learned-alpha": {"alpha": 1.5, "learn_alpha": True, "scaling": None},
    "learned-alpha-asentmax": {"alpha": 1.5, "learn_alpha": True, "scaling": "asentmax"},
}
"""Model fields of each variant; every variant uses the preset's positions (NAPE) unless overridden."""

DEMO_VARIANTS = ("softmax", "ssmax", "entmax", "asentmax")

PRESETS: dict[str, dict] = {
    "demo": {
        "model": {"d_model": 128, "n_layers": 2, "n_heads": 8, "positions": "nape"},
        "train": {"batch_size": 32, "steps": 1500, "lr": 1e-3},
    },
    "paper": {
        "model": {"d_model": 512, "n_layers": 4, "n_heads": 16, "positions": "nape"},
        "train": {"batch_size": 128, "steps": 20000, "lr": 3e-4},
    },
}
"""demo: sizes a 2-core CPU trains in minutes; paper: the published synthetic-task recipe, for GPUs.

Both warm up for a tenth of their steps (RunConfig's default).
"""


def variant_fields(name: str) -> dict:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return dict(VARIANTS[name])


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return {part: dict(values) for part, values in PRESETS[name].items()}
