"""Normalizers: one row of scores -> weights (the entmax family, and the related work's row maps)."""

from ._compile import compile_mode, get_compile_mode, set_compile_mode
from .losses import entmax15_loss, entmax_loss, sparsemax_loss
from .maps import entmax, entmax15, softmax, sparsemax, support_size
from .modules import Entmax, Entmax15, Entmax15Loss, EntmaxLoss, Softmax, Sparsemax, SparsemaxLoss
from .registry import NORMALIZERS, Normalizer, get_normalizer, register_normalizer
from .rowmaps import ROW_MAPS, RowMap, get_row_map, register_row_map
from .threshold import entmax_threshold

__all__ = [
    "NORMALIZERS",
    "ROW_MAPS",
    "Entmax",
    "Entmax15",
    "Entmax15Loss",
    "EntmaxLoss",
    "Normalizer",
    "RowMap",
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
    "get_row_map",
    "register_normalizer",
    "register_row_map",
    "set_compile_mode",
    "softmax",
    "sparsemax",
    "sparsemax_loss",
    "support_size",
]
