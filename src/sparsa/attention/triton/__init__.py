"""The Triton backend: fused alpha-entmax attention kernels for CUDA (and Triton's CPU interpreter)."""

from .function import TritonAttention, triton_attention

__all__ = ["TritonAttention", "triton_attention"]
