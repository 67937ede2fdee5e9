"""sparsa: sparse, length-robust attention for PyTorch."""

from . import layers, models, normalize
from ._version import __version__
from .attention import AttentionStats, KeyPadding, attention
from .normalize import (
    entmax,
    entmax15,
    entmax15_loss,
    entmax_loss,
    entmax_threshold,
    softmax,
    sparsemax,
    sparsemax_loss,
    support_size,
)

__all__ = [
    "AttentionStats",
    "KeyPadding",
    "__version__",
    "attention",
    "entmax",
    "entmax15",
    "entmax15_loss",
    "entmax_loss",
    "entmax_threshold",
    "layers",
    "models",
    "normalize",
    "softmax",
    "sparsemax",
    "sparsemax_loss",
    "support_size",
]
