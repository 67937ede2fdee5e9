"""TransformerConfig: every hyperparameter of the decoder-only model, in one dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..attention import BACKENDS
from ..layers.attention import GATES, SCALED_HEADS
from ..layers.positions import SLOPE_SCHEMES, PositionScheme
from ..layers.scaling import SCALINGS
from ..normalize.rowmaps import get_row_map


@dataclass
class TransformerConfig:
    """A decoder-only transformer: pre-norm RMSNorm blocks, SwiGLU MLPs, sparse attention.

    ``d_ff`` defaults to about 8/3 * d_model rounded up to a multiple of 8
    (the SwiGLU width with the parameter count of a 4x MLP). Attention fields
    are those of :class:`sparsa.layers.SparseAttention`; ``scaling_options``
    go to the scaling module. ``row_map`` replaces alpha-entmax by a row map
    of the related work (``row_options`` fixed, its per-head parameters
    learnt); ``gate`` adds gated attention ("head" or "element").
    ``window`` gives the layers listed in ``window_layers`` (default: all) a
    causal sliding window of that many tokens; the others attend to every
    token, as in hybrid local/global stacks (Gemma 2 and 3, GPT-OSS).
    """

    vocab_size: int
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None
    d_ff: int | None = None
    alpha: float = 1.5
    learn_alpha: bool = False
    scaling: str | None = None
    scaling_options: dict = field(default_factory=dict)
    scaled_heads: str = "auto"
    positions: str = "nape"
    alibi_slopes: str | None = None
    rope_theta: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    backend: str = "auto"
    row_map: str | None = None
    row_options: dict = field(default_factory=dict)
    gate: str | None = None
    window: int | None = None
    window_layers: list[int] | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"n_kv_heads must divide n_heads ({self.n_heads}), got {self.n_kv_heads}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.d_ff is None:
            self.d_ff = 8 * math.ceil(8 * self.d_model / 3 / 8)
        if self.d_ff <= 0:
            raise ValueError(f"d_ff must be positive, got {self.d_ff}")
        if not math.isfinite(self.alpha) or self.alpha < 1:
            raise ValueError(f"alpha must be >= 1, got {self.alpha}")
        if self.scaling is not None and self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be None or one of {SCALINGS}, got {self.scaling!r}")
        if self.scaled_heads not in SCALED_HEADS:
            raise ValueError(f"scaled_heads must be one of {SCALED_HEADS}, got {self.scaled_heads!r}")
        PositionScheme.parse(self.positions)
        if self.alibi_slopes is not None and self.alibi_slopes not in SLOPE_SCHEMES:
            raise ValueError(
                f"alibi_slopes must be None or one of {SLOPE_SCHEMES}, got {self.alibi_slopes!r}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.init_std <= 0 or self.norm_eps <= 0:
            raise ValueError("init_std and norm_eps must be positive")
        if self.backend not in (*BACKENDS, "auto"):
            raise ValueError(f"backend must be one of {(*BACKENDS, 'auto')}, got {self.backend!r}")
        if self.row_map is not None:
            get_row_map(self.row_map).check(self.n_heads, self.row_options)
        elif self.row_options:
            raise ValueError(f"row_options {self.row_options} need a row_map (a variant with one)")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.window is not None and (
            isinstance(self.window, bool) or not isinstance(self.window, int) or self.window <= 0
        ):
            raise ValueError(f"window must be None or a positive integer, got {self.window!r}")
        if self.window_layers is not None:
            if self.window is None:
                raise ValueError("window_layers needs a window")
            wrong = [i for i in self.window_layers if not isinstance(i, int) or not 0 <= i < self.n_layers]
            if wrong:
                raise ValueError(f"window_layers must be layer indices in [0, {self.n_layers}), got {wrong}")

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (None: it attends to every token)."""
        if self.window_layers is None or layer in self.window_layers:
            return self.window
        return None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TransformerConfig:
        return from_fields(cls, values)


def from_fields(cls, values: dict):
    """The dataclass ``cls`` built from ``values``, naming the unknown fields if there are any."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    return cls(**values)
