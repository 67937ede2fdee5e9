"""Where tokens are: absolute positions, key padding, ALiBi/NAPE slopes and RoPE.

Positions are absolute token positions counted over real tokens only, so a
left-padded batch, a cached prefix and a full forward give every token the
same position, the same rotary angles and the same number of visible keys.
ALiBi biases depend only on the distance between a query and a key, which
``sparsa.attention`` computes from indices; padding shifts both indices
equally, so the distance is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..attention import KeyPadding

POSITION_PARTS = ("nope", "alibi", "nape", "rope")
SLOPE_SCHEMES = ("geometric", "linear", "exp")


@dataclass(frozen=True)
class PositionScheme:
    """A parsed ``positions`` string: "nope", "alibi", "nape", "rope" or "rope+alibi", "rope+nape".

    ``alibi`` puts a bias on every head, ``nape`` on the first half of the
    heads (the rest are NoPE heads), ``rope`` rotates queries and keys of
    every head.
    """

    rope: bool
    alibi: str | None  # None, "all" or "half"

    @classmethod
    def parse(cls, positions: str) -> PositionScheme:
        if not isinstance(positions, str):
            raise TypeError(f"positions must be a string, got {type(positions).__name__}")
        parts = positions.split("+")
        unknown = [p for p in parts if p not in POSITION_PARTS]
        if unknown or len(set(parts)) != len(parts):
            raise ValueError(
                f"positions must be one of {POSITION_PARTS} or 'rope+alibi', 'rope+nape', got {positions!r}"
            )
        if "nope" in parts and len(parts) > 1:
            raise ValueError(f"positions 'nope' cannot be combined, got {positions!r}")
        if "alibi" in parts and "nape" in parts:
            raise ValueError(f"positions takes 'alibi' or 'nape', not both, got {positions!r}")
        alibi = "all" if "alibi" in parts else "half" if "nape" in parts else None
        return cls(rope="rope" in parts, alibi=alibi)

    def alibi_heads(self, n_heads: int) -> int:
        """How many heads (the first ones) carry an ALiBi bias."""
        return {None: 0, "all": n_heads, "half": n_heads // 2}[self.alibi]


def alibi_slopes(n_heads: int, scheme: str = "geometric") -> Tensor:
    """Slopes for ``n_heads`` ALiBi heads, largest first.

    "geometric": 2^(-8h/H), h = 1..H (the original ALiBi); "linear": 1/h;
    "exp": 2^-(h-1) (the NAPE variants).
    """
    if n_heads < 0:
        raise ValueError(f"n_heads must be >= 0, got {n_heads}")
    h = torch.arange(1, n_heads + 1, dtype=torch.float64)
    if scheme == "geometric":
        slopes = torch.pow(2.0, -8.0 * h / max(n_heads, 1))
    elif scheme == "linear":
        slopes = 1.0 / h
    elif scheme == "exp":
        slopes = torch.pow(2.0, -(h - 1))
    else:
        raise ValueError(f"alibi slope scheme must be one of {SLOPE_SCHEMES}, got {scheme!r}")
    return slopes.float()


def head_slopes(scheme: PositionScheme, n_heads: int, slope_scheme: str) -> Tensor | None:
    """Per-head slopes (H,): ALiBi heads first, zeros for NoPE heads; None without ALiBi."""
    n_alibi = scheme.alibi_heads(n_heads)
    if scheme.alibi is None:
        return None
    if n_alibi == 0:
        raise ValueError(f"positions with 'nape' needs at least 2 heads, got {n_heads}")
    slopes = torch.zeros(n_heads)
    slopes[:n_alibi] = alibi_slopes(n_alibi, slope_scheme)
    return slopes


@dataclass(frozen=True)
class TokenLayout:
    """Positions of the current tokens and padding of all keys (cached ones included).

    ``positions`` (B, N): absolute position of each current token among the
    real tokens of its row; ``key_padding``: real keys per row (None when no
    row is padded); ``key_count`` (B,): real keys per row.
    """

    positions: Tensor
    key_padding: KeyPadding | None
    key_count: Tensor

    @classmethod
    def build(
        cls, batch: int, n_new: int, n_past: int, attention_mask: Tensor | None, device: torch.device
    ) -> TokenLayout:
        """Layout of ``n_new`` tokens after ``n_past`` cached ones.

        ``attention_mask`` (B, n_past + n_new), 1 for real tokens, 0 for
        padding, must pad on one side: left (generation, cached decoding) or
        right (training batches).
        """
        n_total = n_past + n_new
        if attention_mask is None:
            positions = torch.arange(n_past, n_total, device=device).expand(batch, n_new)
            count = torch.full((batch,), n_total, device=device, dtype=torch.long)
            return cls(positions, None, count)
        mask = _check_attention_mask(attention_mask, batch, n_total, device)
        count = mask.sum(dim=1)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, n_past:]
        if bool((count == n_total).all()):
            return cls(positions, None, count)
        side = "right" if bool((mask[:, -1] == 0).any()) else "left"
        index = torch.arange(n_total, device=device)
        expected = index < count[:, None] if side == "right" else index >= (n_total - count)[:, None]
        if not torch.equal(mask.bool(), expected):
            raise ValueError(
                "attention_mask must pad every row on the same side (all zeros before the tokens, or all "
                "after them), with the real tokens contiguous"
            )
        return cls(positions, KeyPadding(count, side), count)

    def visible_keys(self, is_causal: bool) -> Tensor:
        """(B, N) number of real keys each current token attends to."""
        if is_causal:
            return self.positions + 1
        return self.key_count[:, None].expand_as(self.positions)


def _check_attention_mask(mask: Tensor, batch: int, n_total: int, device: torch.device) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"attention_mask must be a tensor (B, N) of 0/1, got {type(mask).__name__}")
    if mask.shape != (batch, n_total):
        raise ValueError(
            f"attention_mask must have shape ({batch}, {n_total}) (cached plus new tokens), "
            f"got {tuple(mask.shape)}"
        )
    if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    if not mask.is_floating_point() and mask.dtype != torch.bool and bool(((mask < 0) | (mask > 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1")
    return mask.to(device=device, dtype=torch.long)


def rope_angles(
    positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos and sin (B, 1, N, head_dim / 2) of the rotary angles, in ``dtype``."""
    if head_dim % 2:
        raise ValueError(f"rope needs an even head_dim, got {head_dim}")
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    angles = positions.to(dtype)[:, None, :, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, N, D) by the angles, GPT-NeoX layout (pairs i and i + D/2), in the angles' dtype."""
    first, second = x.to(cos.dtype).chunk(2, dim=-1)
    rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return rotated.to(x.dtype)


def length_log(visible_keys: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """log(n + 1) for n visible keys: positive from the first token on.

    The published code uses log(i + 2) for a 0-based position i, i.e. the
    same value; log n itself would be 0 at the first token, where
    (log n)^gamma with gamma < 0 is infinite.
    """
    return torch.log1p(visible_keys.to(dtype))


def check_theta(theta: float) -> float:
    if not math.isfinite(theta) or theta <= 1:
        raise ValueError(f"rope_theta must be a finite number > 1, got {theta}")
    return float(theta)
