"""nn.Modules: length-aware score scaling, positions and sparse attention."""

from .attention import SparseAttention, alpha_from_logit, learnable_alpha
from .feedforward import SwiGLU
from .positions import PositionScheme, TokenLayout, alibi_slopes, apply_rope, length_log, rope_angles
from .scaling import (
    SCALINGS,
    ASEntmaxScale,
    SSMaxScale,
    StaticASEntmaxScale,
    TemperatureScale,
    make_scaling,
    scale_heads,
)

__all__ = [
    "SCALINGS",
    "ASEntmaxScale",
    "PositionScheme",
    "SSMaxScale",
    "SparseAttention",
    "StaticASEntmaxScale",
    "SwiGLU",
    "TemperatureScale",
    "TokenLayout",
    "alibi_slopes",
    "alpha_from_logit",
    "apply_rope",
    "learnable_alpha",
    "length_log",
    "make_scaling",
    "rope_angles",
    "scale_heads",
]
