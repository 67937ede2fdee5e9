"""Attention: q, k, v -> output with alpha-entmax weights, dense or memory-efficient."""

from .api import BACKENDS, attention
from .diagnostics import WeightSummary, weight_summary
from .masks import KeyPadding
from .stats import AttentionStats

__all__ = ["BACKENDS", "AttentionStats", "KeyPadding", "WeightSummary", "attention", "weight_summary"]
