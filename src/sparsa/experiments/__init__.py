"""Training on short sequences, evaluation at long ones: runs, sweeps, results and the demo."""

from .evaluate import evaluate
from .results import report, table
from .sweep import default_lengths, sweep
from .train import RunConfig, train
from .variants import DEMO_VARIANTS, PRESETS, VARIANTS

__all__ = [
    "DEMO_VARIANTS",
    "PRESETS",
    "VARIANTS",
    "RunConfig",
    "default_lengths",
    "evaluate",
    "report",
    "sweep",
    "table",
    "train",
]
