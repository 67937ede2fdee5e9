"""A decoder-only transformer built from sparsa layers, with KV-cache generation."""

from .cache import KVCache, LayerCache
from .config import TransformerConfig
from .generation import generate
from .transformer import Transformer

__all__ = ["KVCache", "LayerCache", "Transformer", "TransformerConfig", "generate"]
