"""The Triton backend: fused alpha-entmax attention kernels for CUDA (and Triton's CPU interpreter)."""

from .function import DEFAULT_TILE_SIZES, TileSizes, TritonAttention, triton_attention

__all__ = ["DEFAULT_TILE_SIZES", "TileSizes", "TritonAttention", "triton_attention"]
