"""Row maps of the related work: weights from one row of attention scores, beside the entmax family.

Every map takes scores (B, H, rows, keys) whose hidden keys are -inf and
returns weights of the same shape: zero on hidden keys, zero rows where no
key is visible, and gradients through autograd (the blocked attention backend
recomputes them per query block, so memory stays O(N) per head). Per-head
parameters arrive as tensors (H,); fixed options as floats. The maps, with
the papers they come from, are described in docs/mathematics.md.

Rows are not always distributions: stick-breaking drops the mass left on the
stick, elastic-softmax cuts weights below zero, alpha-ReLU, sigmoid and NAP
do not normalise (NAP's weights are signed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

ADAPTIVE_TEMPERATURE_FIT = (-0.037, 0.481, -2.3, 4.917, -1.791)
"""Velickovic et al. (2024): inverse temperature from the entropy H (nats), highest power first."""


def _visible(scores: Tensor) -> Tensor:
    return scores > -math.inf


def _visible_count(scores: Tensor) -> Tensor:
    return _visible(scores).sum(-1, keepdim=True).to(scores.dtype)


def _safe_softmax(scores: Tensor) -> Tensor:
    """softmax over the visible keys; all-hidden rows give zeros (not NaN)."""
    peak = scores.amax(-1, keepdim=True)
    peak = torch.where(peak > -math.inf, peak, torch.zeros_like(peak)).detach()
    exps = torch.exp(scores - peak)
    total = exps.sum(-1, keepdim=True)
    return exps / torch.where(total > 0, total, torch.ones_like(total))


def _heads(parameter: Tensor, scores: Tensor) -> Tensor:
    """A per-head (H,) parameter broadcast over (B, H, rows, keys)."""
    return parameter.to(scores.dtype).view(1, -1, 1, 1)


def topk_softmax(scores: Tensor, *, k: float) -> Tensor:
    """softmax over the k largest visible scores of each row (all tied at the k-th kept), zeros elsewhere."""
    if k != int(k) or k < 1:
        raise ValueError(f"row map 'topk-softmax': option k must be a whole number of keys >= 1, got {k!r}")
    kept = min(int(k), scores.shape[-1])
    kth = scores.detach().topk(kept, dim=-1).values[..., -1:]
    return _safe_softmax(scores.masked_fill(scores < kth, -math.inf))


def stick_breaking(scores: Tensor, *, current: float) -> Tensor:
    """A_ij = sigmoid(z_ij) prod_{j<l} (1 - sigmoid(z_il)) over the visible keys after j, in log space.

    Keys are in causal order, the nearest last, so the nearest key breaks the
    stick first. The mass left on the stick is dropped: rows sum to at most 1.
    ``current`` 1 attends to the query's own token, the last visible key of
    its row; 0 hides it, so the first token's row is empty.
    """
    if current not in (0, 1):
        raise ValueError(f"row map 'stick-breaking': option current must be 0 or 1, got {current!r}")
    visible = _visible(scores)
    if not current:
        last = visible & (visible.cumsum(-1) == visible.sum(-1, keepdim=True))
        visible = visible & ~last
    finite = torch.where(visible, scores, torch.zeros_like(scores))
    keep_log = torch.where(visible, F.logsigmoid(-finite), torch.zeros_like(scores))
    after = keep_log.flip(-1).cumsum(-1).flip(-1) - keep_log
    return torch.where(visible, torch.exp(F.logsigmoid(finite) + after), torch.zeros_like(scores))


def adaptive_temperature(scores: Tensor) -> Tensor:
    """softmax(beta z), beta = max(1, poly(H)) where the entropy H of softmax(z) exceeds 0.5, else 1.

    The gradient runs through beta too (the entropy and the polynomial), so
    the map is the function it says, trained as such.
    """
    weights = _safe_softmax(scores)
    logs = torch.where(
        weights > 0, weights.clamp_min(torch.finfo(weights.dtype).tiny).log(), torch.zeros_like(weights)
    )
    entropy = -(weights * logs).sum(-1, keepdim=True)
    fit = torch.zeros_like(entropy)
    for coefficient in ADAPTIVE_TEMPERATURE_FIT:
        fit = fit * entropy + coefficient
    beta = torch.where(entropy > 0.5, fit.clamp_min(1.0), torch.ones_like(entropy))
    visible = _visible(scores)
    # Scale the finite scores only: d(z beta)/d beta = z would be -inf on hidden keys.
    finite = torch.where(visible, scores, torch.zeros_like(scores))
    return _safe_softmax(torch.where(visible, finite * beta, scores))


def elastic_softmax(scores: Tensor, *, tau: Tensor) -> Tensor:
    """ReLU(softmax(z)_ij + tau_h / n_i), n_i the visible keys; rows may sum to less than 1."""
    shifted = _safe_softmax(scores) + _heads(tau, scores) / _visible_count(scores).clamp_min(1)
    return torch.where(_visible(scores), F.relu(shifted), torch.zeros_like(scores))


def normalized_attention(scores: Tensor, *, gain: Tensor, bias: Tensor) -> Tensor:
    """NAP: g_h (z - mean) / (std + 1e-3) + b_h over the visible scores of a row; signed, not normalised."""
    visible = _visible(scores)
    count = _visible_count(scores).clamp_min(1)
    finite = torch.where(visible, scores, torch.zeros_like(scores))
    mean = finite.sum(-1, keepdim=True) / count
    centred = torch.where(visible, finite - mean, torch.zeros_like(scores))
    variance = centred.square().sum(-1, keepdim=True) / count
    # sqrt has an infinite slope at 0 (a single key, equal scores): take those rows' std as the constant 0.
    std = torch.where(variance > 0, torch.where(variance > 0, variance, 1.0).sqrt(), 0.0)
    weights = _heads(gain, scores) * centred / (std + 1e-3) + _heads(bias, scores)
    return torch.where(visible, weights, torch.zeros_like(scores))


def alpha_relu(scores: Tensor, *, alpha: float, tau: float) -> Tensor:
    """[(alpha - 1) z - tau]_+ ^ (1 / (alpha - 1)), not normalised."""
    if not alpha > 1:
        raise ValueError(f"row map 'alpha-relu': option alpha must be above 1, got {alpha!r}")
    base = (alpha - 1) * scores - tau
    positive = base > 0
    safe = torch.where(positive, base, torch.ones_like(base))
    return torch.where(positive, safe ** (1 / (alpha - 1)), torch.zeros_like(scores))


def sigmoid_attention(scores: Tensor) -> Tensor:
    """sigmoid(z - log n_i), n_i the visible keys of the row (Ramapuram et al. 2024)."""
    log_count = _visible_count(scores).clamp_min(1).log()
    return torch.where(_visible(scores), torch.sigmoid(scores - log_count), torch.zeros_like(scores))


SOFTPICK_EPS = 1e-6


def softpick(scores: Tensor) -> Tensor:
    """ReLU(e^z - 1) / (sum_j |e^z_j - 1| + eps), both scaled by e^-m with m = max(0, row max)."""
    visible = _visible(scores)
    peak = scores.amax(-1, keepdim=True).clamp_min(0).detach()
    shifted = torch.where(visible, torch.exp(scores - peak) - torch.exp(-peak), torch.zeros_like(scores))
    total = shifted.abs().sum(-1, keepdim=True) + SOFTPICK_EPS * torch.exp(-peak)
    return F.relu(shifted) / total


@dataclass(frozen=True)
class RowMap:
    """A registered row map: its function, per-head parameters (with start values) and fixed options.

    ``causal``: the map reads keys in causal order and needs causal attention.
    ``normalized``: every visible row sums to 1.
    """

    name: str
    description: str
    function: Callable[..., Tensor]
    parameters: dict[str, float] = field(default_factory=dict)
    options: dict[str, float] = field(default_factory=dict)
    causal: bool = False
    normalized: bool = False

    def __call__(self, scores: Tensor, parameters: dict[str, Tensor] | None = None, **options) -> Tensor:
        return self.weigh(scores, **self.arguments(scores.shape[1], parameters, options, scores))

    def weigh(self, scores: Tensor, **arguments) -> Tensor:
        """The map's weights; a row with a NaN score is NaN, whatever the map would make of it."""
        weights = self.function(scores, **arguments)
        return weights.masked_fill(scores.isnan().any(-1, keepdim=True), float("nan"))

    def check(self, heads: int, options: dict) -> None:
        """Refuse, with the option named, options this map does not take or cannot use."""
        self(torch.zeros(1, heads, 1, 1), None, **options)

    def arguments(self, heads: int, parameters, options, like: Tensor) -> dict:
        """The keyword arguments of the function: the given parameters and options, defaults for the rest."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"row map {self.name!r} takes options {sorted(self.options)}, got {unknown}")
        given = dict(parameters or {})
        missing = sorted(set(given) ^ set(self.parameters))
        if given and missing:
            raise ValueError(
                f"row map {self.name!r} takes parameters {sorted(self.parameters)}, got {sorted(given)}"
            )
        values = {
            name: given.get(name, torch.full((heads,), start, dtype=like.dtype, device=like.device))
            for name, start in self.parameters.items()
        }
        for name, value in values.items():
            if value.shape != (heads,):
                raise ValueError(
                    f"row map parameter {name!r} must have shape ({heads},), got {tuple(value.shape)}"
                )
        return {**values, **{**self.options, **options}}


ROW_MAPS: dict[str, RowMap] = {}


def register_row_map(row_map: RowMap) -> RowMap:
    if row_map.name in ROW_MAPS:
        raise ValueError(f"a row map named {row_map.name!r} is already registered")
    ROW_MAPS[row_map.name] = row_map
    return row_map


def get_row_map(name: str) -> RowMap:
    if name not in ROW_MAPS:
        raise ValueError(f"unknown row map {name!r}; known: {', '.join(ROW_MAPS)}")
    return ROW_MAPS[name]


register_row_map(
    RowMap(
        "topk-softmax", "softmax over the k largest scores", topk_softmax, options={"k": 8}, normalized=True
    )
)
register_row_map(
    RowMap(
        "stick-breaking",
        "stick-breaking attention (leftover dropped)",
        stick_breaking,
        options={"current": 1},
        causal=True,
    )
)
register_row_map(
    RowMap(
        "adaptive-temperature", "entropy-adaptive temperature softmax", adaptive_temperature, normalized=True
    )
)
register_row_map(
    RowMap("elastic-softmax", "ReLU(softmax + tau_h / n)", elastic_softmax, parameters={"tau": -1.0})
)
register_row_map(
    RowMap(
        "nap",
        "normalised attention (standardised scores)",
        normalized_attention,
        parameters={"gain": 1.0, "bias": 0.0},
    )
)
register_row_map(
    RowMap(
        "alpha-relu", "[(alpha - 1) z - tau]_+^(1/(alpha-1))", alpha_relu, options={"alpha": 1.5, "tau": 0.0}
    )
)
register_row_map(RowMap("sigmoid", "sigmoid(z - log n)", sigmoid_attention))
register_row_map(RowMap("softpick", "ReLU(e^z - 1) / sum |e^z - 1|", softpick))
