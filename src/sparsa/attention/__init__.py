"""Attention: q, k, v -> output with alpha-entmax weights, dense or memory-efficient; paged decoding."""

from .api import BACKENDS, attention, attention_weights
from .diagnostics import WeightSummary, weight_summary
from .masks import KeyPadding
from .paged import DecodeStats, PagedKVCache, decode
from .stats import AttentionStats

__all__ = [
    "BACKENDS",
    "AttentionStats",
    "DecodeStats",
    "KeyPadding",
    "PagedKVCache",
    "WeightSummary",
    "attention",
    "attention_weights",
    "decode",
    "weight_summary",
]
