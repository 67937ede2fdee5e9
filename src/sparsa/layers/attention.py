"""SparseAttention: projections, positions, length-aware scaling and alpha-entmax attention."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor, nn

from ..attention import BACKENDS, attention
from ..normalize._validate import compute_dtype
from ..normalize.rowmaps import get_row_map
from .positions import (
    SLOPE_SCHEMES,
    PositionScheme,
    TokenLayout,
    apply_rope,
    check_theta,
    head_slopes,
    length_log,
    rope_angles,
)
from .scaling import make_scaling, scale_heads

SCALED_HEADS = ("auto", "all", "nope")
GATES = (None, "head", "element")


class KeyValueStore(Protocol):
    """What a KV cache gives one layer: the cached length and an append that returns all keys and values.

    A store that also has ``attend(q, k, v, layout, **options)`` (a paged
    cache) takes the new keys and values and computes the attention itself;
    the layer's ``observer`` is not called then.
    """

    @property
    def length(self) -> int: ...

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


class SparseAttention(nn.Module):
    """Multi-head (grouped-query) alpha-entmax self-attention with length-aware scaling.

    Args:
        d_model: width of the input and output.
        n_heads: query heads; ``n_kv_heads`` (default ``n_heads``) key/value
            heads, a divisor of ``n_heads``.
        head_dim: per-head width, default ``d_model // n_heads``.
        alpha: entmax alpha (1.0 = softmax, 1.5, 2.0 = sparsemax, any >= 1).
        learn_alpha: learn one alpha per head in (1, 2), starting at ``alpha``.
        scaling: None, "asentmax", "asentmax-static", "ssmax", "temperature"
            or "learned-temperature" (see :mod:`sparsa.layers.scaling`);
            ``scaling_options`` go to its constructor.
        scaled_heads: "auto" (the NoPE heads under NAPE, every head
            otherwise), "all" or "nope" (heads without ALiBi).
        positions: "nope", "alibi", "nape", "rope", "rope+alibi", "rope+nape".
        alibi_slopes: "geometric", "linear" or "exp"; default "linear" for
            NAPE and "geometric" for ALiBi.
        rope_theta: RoPE base.
        is_causal: decoder (True) or bidirectional attention.
        window: None, or a sliding window: each token attends to at most
            this many most recent tokens, itself included (needs is_causal).
        backend: passed to :func:`sparsa.attention`.
        row_map: instead of alpha-entmax, a row map of the related work
            (:data:`sparsa.normalize.ROW_MAPS`), its per-head parameters
            learnt here from their start values, ``row_options`` fixed.
        gate: None, "head" (one sigmoid gate per head) or "element" (one per
            output channel): gated attention (Qiu et al. 2025), each head's
            output times sigmoid(W x) of the layer input before the output
            projection.

    ``observer``, when set to a callable, receives the final queries and keys
    (after positions, scaling and the cache) and the keyword arguments of
    :func:`sparsa.attention` before each call, e.g. to summarise the weights
    with :func:`sparsa.attention.weight_summary`.

    alpha = 1 with scaling "ssmax" is the SSMax baseline; alpha = 1 without
    scaling is softmax attention.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        head_dim: int | None = None,
        alpha: float = 1.5,
        learn_alpha: bool = False,
        scaling: str | None = None,
        scaling_options: dict | None = None,
        scaled_heads: str = "auto",
        positions: str = "nape",
        alibi_slopes: str | None = None,
        rope_theta: float = 10000.0,
        is_causal: bool = True,
        window: int | None = None,
        backend: str = "auto",
        row_map: str | None = None,
        row_options: dict | None = None,
        gate: str | None = None,
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        _check_positive("d_model", d_model)
        _check_positive("n_heads", n_heads)
        _check_positive("n_kv_heads", n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(
                    f"d_model ({d_model}) must be divisible by n_heads ({n_heads}) or give head_dim"
                )
            head_dim = d_model // n_heads
        _check_positive("head_dim", head_dim)
        if not math.isfinite(alpha) or alpha < 1:
            raise ValueError(f"alpha must be >= 1, got {alpha}")
        if scaled_heads not in SCALED_HEADS:
            raise ValueError(f"scaled_heads must be one of {SCALED_HEADS}, got {scaled_heads!r}")
        if backend not in (*BACKENDS, "auto"):
            raise ValueError(f"backend must be one of {(*BACKENDS, 'auto')}, got {backend!r}")
        scheme = PositionScheme.parse(positions)
        if alibi_slopes is None:
            alibi_slopes = "linear" if scheme.alibi == "half" else "geometric"
        if alibi_slopes not in SLOPE_SCHEMES:
            raise ValueError(f"alibi_slopes must be one of {SLOPE_SCHEMES}, got {alibi_slopes!r}")
        if scheme.rope:
            check_theta(rope_theta)
            if head_dim % 2:
                raise ValueError(f"rope needs an even head_dim, got {head_dim}")

        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        if window is not None:
            _check_positive("window", window)
            if not is_causal:
                raise ValueError("window needs is_causal=True: a sliding window holds the most recent tokens")
        self.is_causal, self.window, self.backend = is_causal, window, backend
        self.rope_theta = float(rope_theta) if scheme.rope else None
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)

        slopes = head_slopes(scheme, n_heads, alibi_slopes)
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        n_alibi = scheme.alibi_heads(n_heads)
        if scaled_heads == "all" or (scaled_heads == "auto" and scheme.alibi != "half"):
            scaled = torch.arange(n_heads)
        else:
            scaled = torch.arange(n_alibi, n_heads)
        if scaling is not None and scaled.numel() == 0:
            raise ValueError(f"scaling {scaling!r} with scaled_heads={scaled_heads!r} scales no head")
        self.register_buffer("scaled_heads", scaled, persistent=False)
        self.scaling = make_scaling(scaling, d_model, scaled.numel(), **(scaling_options or {}))

        self.observer = None
        self.fixed_alpha = float(alpha)
        self.alpha_logit = learnable_alpha(alpha, n_heads) if learn_alpha else None
        self.row_map, self.row_options = row_map, dict(row_options or {})
        if row_map is not None and get_row_map(row_map).causal and not is_causal:
            raise ValueError(f"row map {row_map!r} reads keys in causal order and needs is_causal=True")
        self.row_parameters = row_map_parameters(row_map, self.row_options, n_heads, learn_alpha)
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        self.gate = None
        if gate is not None:
            self.gate = nn.Linear(d_model, n_heads if gate == "head" else n_heads * head_dim, bias=False)

    def weighting(self) -> dict:
        return weighting_options(self.alpha, self.row_map, self.row_parameters, self.row_options)

    def gated(self, out: Tensor, x: Tensor) -> Tensor:
        """Attention output (B, H, rows, Dv) times the sigmoid gate of the rows' inputs (B, rows, d_model)."""
        if self.gate is None:
            return out
        gate = torch.sigmoid(self.gate(x)).view(x.shape[0], x.shape[1], self.n_heads, -1).transpose(1, 2)
        return out * gate.to(out.dtype)

    @property
    def alpha(self) -> float | Tensor:
        """The entmax alpha: a float, or (H,) in (1, 2) when learnt."""
        return self.fixed_alpha if self.alpha_logit is None else alpha_from_logit(self.alpha_logit)

    def query_scale(self, x: Tensor, layout: TokenLayout) -> Tensor | None:
        """Multiplier (B, H, N) of the queries, 1 on heads that are not scaled; None without scaling."""
        if self.scaling is None:
            return None
        visible = layout.visible_keys(self.is_causal)
        if self.window is not None:
            visible = visible.clamp_max(self.window)
        log_n = length_log(visible, compute_dtype(x.dtype))
        return scale_heads(self.scaling, x, log_n, self.n_heads, self.scaled_heads)

    def forward(
        self,
        x: Tensor,
        layout: TokenLayout | None = None,
        cache: KeyValueStore | None = None,
        last_queries: int | None = None,
    ) -> Tensor:
        """x (B, N, d_model) -> (B, N, d_model), or (B, last_queries, d_model).

        ``layout`` gives positions and key padding (default: N unpadded tokens
        after the cached ones); ``cache`` holds this layer's keys and values
        of earlier tokens and receives the new ones. ``last_queries``: attend
        from the last that many tokens only (every token still gives its key
        and value), when nothing after this layer needs the others.
        """
        batch, n, _ = x.shape
        if layout is None:
            layout = TokenLayout.build(batch, n, 0 if cache is None else cache.length, None, x.device)
        rows = n if last_queries is None else min(n, last_queries)
        q = self.q_proj(x[:, n - rows :]).view(batch, rows, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope_theta is not None:
            cos, sin = rope_angles(layout.positions, self.head_dim, self.rope_theta, compute_dtype(q.dtype))
            q = apply_rope(q, cos[..., n - rows :, :], sin[..., n - rows :, :])
            k = apply_rope(k, cos, sin)
        scale = self.query_scale(x, layout)
        if scale is not None:
            q = q * scale[..., n - rows :, None].to(q.dtype)
        options = {
            **self.weighting(),
            "is_causal": self.is_causal,
            "window": self.window,
            "attn_mask": layout.key_padding,
            "alibi_slopes": self.alibi_slopes,
        }
        attend = getattr(cache, "attend", None)
        if attend is not None:
            out = self.gated(attend(q, k, v, layout, **options), x[:, n - rows :])
            return self.o_proj(out.transpose(1, 2).reshape(batch, rows, -1))
        if cache is not None:
            k, v = cache.update(k, v)
        if self.observer is not None:
            self.observer(q, k, **options)
        out = self.gated(attention(q, k, v, backend=self.backend, **options), x[:, n - rows :])
        return self.o_proj(out.transpose(1, 2).reshape(batch, rows, -1))


def row_map_parameters(
    row_map: str | None, options: dict, n_heads: int, learn_alpha: bool
) -> nn.ParameterDict:
    """The per-head parameters of ``row_map`` at their start values (none without a row map)."""
    parameters = nn.ParameterDict()
    if row_map is None:
        return parameters
    if learn_alpha:
        raise ValueError(f"learn_alpha learns entmax's alpha; row map {row_map!r} has none")
    chosen = get_row_map(row_map)
    chosen.check(n_heads, options)
    for name, start in chosen.parameters.items():
        parameters[name] = nn.Parameter(torch.full((n_heads,), float(start)))
    return parameters


def weighting_options(
    alpha: float | Tensor, row_map: str | None, parameters: nn.ParameterDict, options: dict
) -> dict:
    """The options of :func:`sparsa.attention` that say how scores become weights."""
    if row_map is None:
        return {"alpha": alpha}
    return {"row_map": row_map, "row_parameters": dict(parameters.items()), "row_options": options}


def learnable_alpha(alpha: float, n_heads: int) -> nn.Parameter:
    """Per-head logits of alpha = 1 + sigmoid(logit), all starting at ``alpha`` in (1, 2)."""
    if not 1 < alpha < 2:
        raise ValueError(f"learn_alpha keeps alpha in (1, 2); the start value alpha={alpha} is outside")
    return nn.Parameter(torch.full((n_heads,), math.log((alpha - 1) / (2 - alpha))))


def alpha_from_logit(logit: Tensor) -> Tensor:
    return 1 + torch.sigmoid(logit)


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
