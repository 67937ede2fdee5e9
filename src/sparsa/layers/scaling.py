"""Length-aware score scaling: ASEntmax, SSMax, temperatures, log-n and position temperature, on queries.

Every scaling returns a multiplier per (batch, head, token) that the attention
layer applies to the queries, so any attention backend fuses it for free.
``log_n`` is :func:`sparsa.layers.positions.length_log` of the number of real
keys a query sees, so padding and cached prefixes do not change it; the scale
is computed in its dtype (fp32, or fp64 for fp64 models).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCALINGS = (
    "asentmax",
    "asentmax-static",
    "ssmax",
    "temperature",
    "learned-temperature",
    "log-n",
    "position-temperature",
)


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class _ASEntmaxFormula(nn.Module):
    """scale = delta + softplus(beta_raw) * (log n)^(gamma_max * tanh(gamma_raw)), shared by both variants."""

    def __init__(self, delta: float, gamma_max: float, beta_init: float) -> None:
        super().__init__()
        if beta_init <= 0:
            raise ValueError(f"beta_init must be > 0, got {beta_init}")
        self.delta, self.gamma_max, self.beta_init = float(delta), float(gamma_max), float(beta_init)

    def scale(self, beta_raw: Tensor, gamma_raw: Tensor, log_n: Tensor) -> Tensor:
        """beta_raw, gamma_raw broadcastable to (B, heads, N); log_n (B, N)."""
        beta = F.softplus(beta_raw.to(log_n.dtype))
        gamma = self.gamma_max * torch.tanh(gamma_raw.to(log_n.dtype))
        return self.delta + beta * torch.exp(gamma * torch.log(log_n)[:, None, :])


class ASEntmaxScale(_ASEntmaxFormula):
    """Adaptive-scalable entmax: scale = delta + beta * (log n)^gamma, per token and head.

    beta = softplus(W_beta x + b_beta) and gamma = gamma_max * tanh(W_gamma x + b_gamma)
    come from the attention layer's (normalised) input x, one output per
    scaled head; delta = 1, gamma_max = 2 as published.

    Initialisation: both projections start at zero weight, with b_beta giving
    beta = ``beta_init`` (0.1) and b_gamma = 0 (gamma = 0), so every row starts
    with scale 1 + beta_init, close to 1 and independent of n. With default
    random initialisation the scale at n = 64 spans about 1.7 to 19 across rows;
    rows near hard-max pass no gradient to their keys and training stalls on a
    plateau (docs/mathematics.md, section 4). Zero weights still receive gradients, so
    the dependence on x and on log n is learnt from the first step.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        delta: float = 1.0,
        gamma_max: float = 2.0,
        beta_init: float = 0.1,
    ) -> None:
        super().__init__(delta, gamma_max, beta_init)
        self.beta = nn.Linear(d_model, n_heads)
        self.gamma = nn.Linear(d_model, n_heads)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.beta.weight)
        nn.init.constant_(self.beta.bias, inverse_softplus(self.beta_init))
        nn.init.zeros_(self.gamma.weight)
        nn.init.zeros_(self.gamma.bias)

    def forward(self, x: Tensor, log_n: Tensor) -> Tensor:
        """x (B, N, d_model), log_n (B, N) -> scale (B, heads, N)."""
        return self.scale(self.beta(x).transpose(1, 2), self.gamma(x).transpose(1, 2), log_n)


class StaticASEntmaxScale(_ASEntmaxFormula):
    """ASEntmax with per-head learnt beta_h, gamma_h: scale = delta + beta_h * (log n)^gamma_h.

    Starts at beta = ``beta_init``, gamma = 0 for the reason given in
    :class:`ASEntmaxScale`.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        delta: float = 1.0,
        gamma_max: float = 2.0,
        beta_init: float = 0.1,
    ) -> None:
        super().__init__(delta, gamma_max, beta_init)
        self.beta_raw = nn.Parameter(torch.full((n_heads,), inverse_softplus(beta_init)))
        self.gamma_raw = nn.Parameter(torch.zeros(n_heads))

    def forward(self, x: Tensor, log_n: Tensor) -> Tensor:
        return self.scale(self.beta_raw[:, None], self.gamma_raw[:, None], log_n)


class SSMaxScale(nn.Module):
    """Scalable softmax: scale = s_h * log n, s_h learnt per head.

    s starts at ``s_init`` = 1 as published: the factor log(n + 1) is then
    0.7 at the first token and 4.2 at 64 keys, the same for every row of a
    position, so unlike an input-dependent scale it cannot start rows near
    hard-max; the growth with log n is the method itself.
    """

    def __init__(self, d_model: int, n_heads: int, *, s_init: float = 1.0) -> None:
        super().__init__()
        if s_init <= 0:
            raise ValueError(f"s_init must be > 0, got {s_init}")
        self.s = nn.Parameter(torch.full((n_heads,), float(s_init)))

    def forward(self, x: Tensor, log_n: Tensor) -> Tensor:
        return self.s.to(log_n.dtype)[:, None] * log_n[:, None, :]


class TemperatureScale(nn.Module):
    """A per-head inverse temperature (a constant multiplier of the scores), fixed or learnt."""

    def __init__(self, d_model: int, n_heads: int, *, inverse_temperature: float = 1.0, learn: bool = False):
        super().__init__()
        if not math.isfinite(inverse_temperature) or inverse_temperature <= 0:
            raise ValueError(f"inverse_temperature must be a positive number, got {inverse_temperature}")
        value = torch.full((n_heads,), float(inverse_temperature))
        if learn:
            self.inverse_temperature = nn.Parameter(value)
        else:
            self.register_buffer("inverse_temperature", value)

    def forward(self, x: Tensor, log_n: Tensor) -> Tensor:
        scale = self.inverse_temperature.to(log_n.dtype)[:, None].expand(-1, log_n.shape[1])
        return scale.unsqueeze(0).expand(log_n.shape[0], -1, -1)


def _log_keys(log_n: Tensor) -> Tensor:
    """log n from log_n = log(n + 1)."""
    return torch.log(torch.expm1(log_n))


class LogNScale(nn.Module):
    """Log-n scaling as some LLMs use it past their context: max(1, log n / log L_train), no parameters."""

    def __init__(self, d_model: int, n_heads: int, *, train_length: float) -> None:
        super().__init__()
        if not train_length > 1:
            raise ValueError(f"log-n scaling needs train_length > 1, got {train_length}")
        self.n_heads, self.log_train = n_heads, math.log(train_length)

    def forward(self, x: Tensor, log_n: Tensor) -> Tensor:
        scale = (_log_keys(log_n) / self.log_train).clamp_min(1.0)
        return scale[:, None, :].expand(-1, self.n_heads, -1)


class PositionTemperatureScale(nn.Module):
    """Selective attention's position temperature (Zhang et al. 2024): 1 + exp(-exp(b)) log i.

    i is the query's 1-based position among the real tokens (its visible keys
    under causal attention); b is one learnt number per layer, starting at 1.5.
    """

    def __init__(self, d_model: int, n_heads: int, *, b_init: float = 1.5) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.b = nn.Parameter(torch.tensor(float(b_init)))

    def forward(self, x: Tensor, log_n: Tensor) -> Tensor:
        scale = 1 + torch.exp(-torch.exp(self.b.to(log_n.dtype))) * _log_keys(log_n)
        return scale[:, None, :].expand(-1, self.n_heads, -1)


def scale_heads(scaling: nn.Module, x: Tensor, log_n: Tensor, n_heads: int, scaled_heads: Tensor) -> Tensor:
    """Query multipliers (B, n_heads, N): ``scaling``'s output on ``scaled_heads``, 1 on the other heads."""
    scale = scaling(x, log_n)
    if scale.shape[1] == n_heads:
        return scale
    ones = scale.new_ones(scale.shape[0], n_heads, scale.shape[2])
    return ones.index_copy(1, scaled_heads, scale)


def make_scaling(name: str | None, d_model: int, n_heads: int, **options: float) -> nn.Module | None:
    """The scaling module called ``name`` for ``n_heads`` heads (None: no scaling)."""
    if name is None:
        return None
    if name == "asentmax":
        return ASEntmaxScale(d_model, n_heads, **options)
    if name == "asentmax-static":
        return StaticASEntmaxScale(d_model, n_heads, **options)
    if name == "ssmax":
        return SSMaxScale(d_model, n_heads, **options)
    if name == "temperature":
        return TemperatureScale(d_model, n_heads, **options)
    if name == "learned-temperature":
        return TemperatureScale(d_model, n_heads, learn=True, **options)
    if name == "log-n":
        return LogNScale(d_model, n_heads, **options)
    if name == "position-temperature":
        return PositionTemperatureScale(d_model, n_heads, **options)
    raise ValueError(f"scaling must be None or one of {SCALINGS}, got {name!r}")
