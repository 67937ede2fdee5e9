"""Normalizers: one row of scores -> weights (softmax, sparsemax, entmax for any alpha)."""

from ._compile import compile_mode, get_compile_mode, set_compile_mode
from .losses import entmax15_loss, entmax_loss, sparsemax_loss
from .maps import entmax, entmax15, softmax, sparsemax, support_size
from .modules import Entmax, Entmax15, Entmax15Loss, EntmaxLoss, Softmax, Sparsemax, SparsemaxLoss
from .registry import NORMALIZERS, Normalizer, get_normalizer, register_normalizer
from .threshold import entmax_threshold

__all__ = [
    "NORMALIZERS",
    "Entmax",
    "Entmax15",
    "Entmax15Loss",
    "EntmaxLoss",
    "Normalizer",
    "Softmax",
    "Sparsemax",
    "SparsemaxLoss",
    "compile_mode",
    "entmax",
    "entmax15",
    "entmax15_loss",
    "entmax_loss",
    "entmax_threshold",
    "get_compile_mode",
    "get_normalizer",
    "register_normalizer",
    "set_compile_mode",
    "softmax",
    "sparsemax",
    "sparsemax_loss",
    "support_size",
]
