"""Attention: q, k, v -> output with alpha-entmax weights, dense or memory-efficient."""

from .api import BACKENDS, attention
from .masks import KeyPadding
from .stats import AttentionStats

__all__ = ["BACKENDS", "AttentionStats", "KeyPadding", "attention"]
