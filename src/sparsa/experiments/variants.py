"""Attention variants and model-size presets, by name."""

from __future__ import annotations

VARIANTS: dict[str, dict] = {
    "softmax": {"alpha": 1.0, "scaling": None},
    "softmax-rope": {"alpha": 1.0, "scaling": None, "positions": "rope"},
    "ssmax": {"alpha": 1.0, "scaling": "ssmax"},
    "entmax": {"alpha": 1.5, "scaling": None},
    "asentmax": {"alpha": 1.5, "scaling": "asentmax"},
    "asentmax-static": {"alpha": 1.5, "scaling": "asentmax-static"},
    "sparsemax": {"alpha": 2.0, "scaling": None},
    "learned-alpha": {"alpha": 1.5, "learn_alpha": True, "scaling": None},
    "learned-alpha-asentmax": {"alpha": 1.5, "learn_alpha": True, "scaling": "asentmax"},
    "topk-softmax": {"alpha": 1.0, "scaling": None, "row_map": "topk-softmax"},
    "stick-breaking": {"alpha": 1.0, "scaling": None, "row_map": "stick-breaking"},
    "adaptive-temperature": {"alpha": 1.0, "scaling": None, "row_map": "adaptive-temperature"},
    "position-temperature": {"alpha": 1.0, "scaling": "position-temperature"},
    "log-n": {"alpha": 1.0, "scaling": "log-n"},
    "focal": {"alpha": 1.0, "scaling": "temperature", "scaling_options": {"inverse_temperature": 2.0}},
    "focal-learned": {"alpha": 1.0, "scaling": "learned-temperature"},
    "gated-softmax": {"alpha": 1.0, "scaling": None, "gate": "head"},
    "gated-softmax-element": {"alpha": 1.0, "scaling": None, "gate": "element"},
    "elastic-softmax": {"alpha": 1.0, "scaling": None, "row_map": "elastic-softmax"},
    "nap": {"alpha": 1.0, "scaling": None, "row_map": "nap"},
    "alpha-relu": {"alpha": 1.0, "scaling": None, "row_map": "alpha-relu"},
    "sigmoid": {"alpha": 1.0, "scaling": None, "row_map": "sigmoid"},
    "softpick": {"alpha": 1.0, "scaling": None, "row_map": "softpick"},
}
"""Model fields of each variant, over the preset's; those that name no positions use the preset's (NAPE)."""

DEMO_VARIANTS = ("softmax", "ssmax", "entmax", "asentmax")
RELATED_VARIANTS = (
    "topk-softmax",
    "stick-breaking",
    "adaptive-temperature",
    "position-temperature",
    "log-n",
    "focal",
    "focal-learned",
    "gated-softmax",
    "gated-softmax-element",
    "elastic-softmax",
    "nap",
    "alpha-relu",
    "sigmoid",
    "softpick",
)
"""The related work's mechanisms, each in the layer where it belongs (docs/mathematics.md)."""
LANGUAGE_VARIANTS = ("softmax-rope", *DEMO_VARIANTS)
"""The language-model comparison: what most language models use, then the demo's four (NAPE)."""

PRESETS: dict[str, dict] = {
    "demo": {
        "model": {"d_model": 128, "n_layers": 2, "n_heads": 8, "positions": "nape"},
        "train": {"batch_size": 32, "steps": 1500, "lr": 1e-3},
    },
    "paper": {
        "model": {"d_model": 512, "n_layers": 4, "n_heads": 16, "positions": "nape"},
        "train": {"batch_size": 128, "steps": 20000, "lr": 3e-4},
    },
    "lm-cpu": {
        "model": {"d_model": 128, "n_layers": 4, "n_heads": 8, "positions": "nape"},
        "train": {
            "batch_size": 32,
            "steps": 2000,
            "lr": 2e-3,
            "min_length": 256,
            "max_length": 256,
            "val_examples": 16,
        },
    },
    "lm-gpu": {
        "model": {"d_model": 512, "n_layers": 8, "n_heads": 16, "positions": "nape"},
        "train": {
            "batch_size": 64,
            "steps": 20000,
            "lr": 6e-4,
            "min_length": 1024,
            "max_length": 1024,
            "val_examples": 32,
        },
    },
}
"""demo: sizes a 2-core CPU trains in minutes; paper: the published synthetic-task recipe, for GPUs;
lm-cpu / lm-gpu: byte-level language models for the text task (contexts of 256 and 1024 bytes).

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
