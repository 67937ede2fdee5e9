"""Layers: the attention module against a dense computation written out by hand, and the scale formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

import sparsa
from sparsa.layers import (
    ASEntmaxScale,
    SparseAttention,
    SSMaxScale,
    StaticASEntmaxScale,
    TemperatureScale,
    TokenLayout,
    alibi_slopes,
)
from sparsa.layers.scaling import make_scaling
from sparsa.normalize import ROW_MAPS, get_row_map

SCALINGS = [None, "asentmax", "asentmax-static", "ssmax", "temperature", "learned-temperature"]
POSITIONS = ["nope", "alibi", "nape", "rope", "rope+nape"]


def _randomize(module: torch.nn.Module) -> None:
    """Move every parameter away from its initial value so no term of a formula is trivially 0 or 1."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))


def _rotate_by_hand(x, positions, theta):
    """RoPE as complex multiplication of the pairs (i, i + D/2)."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    z = z * torch.polar(torch.ones_like(freq), positions[:, None, :, None].double() * freq)
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def _scale_by_hand(layer, x, visible):
    """The published formulas with the layer's parameters, (B, H, N), 1 on unscaled heads."""
    batch, n, _ = x.shape
    log_n = torch.log(visible.double() + 1)
    scaled = layer.scaled_heads
    s = layer.scaling
    if isinstance(s, ASEntmaxScale):
        beta = F.softplus(x.double() @ s.beta.weight.double().T + s.beta.bias.double()).transpose(1, 2)
        gamma = 2 * torch.tanh(x.double() @ s.gamma.weight.double().T + s.gamma.bias.double()).transpose(1, 2)
        values = 1 + beta * log_n[:, None, :] ** gamma
    elif isinstance(s, StaticASEntmaxScale):
        beta = F.softplus(s.beta_raw.double())[None, :, None]
        gamma = 2 * torch.tanh(s.gamma_raw.double())[None, :, None]
        values = 1 + beta * log_n[:, None, :] ** gamma
    elif isinstance(s, SSMaxScale):
        values = s.s.double()[None, :, None] * log_n[:, None, :]
    else:
        values = s.inverse_temperature.double()[None, :, None].expand(batch, -1, n)
    full = torch.ones(batch, layer.n_heads, n, dtype=torch.float64)
    full[:, scaled] = values
    return full


def _dense_by_hand(layer, x, positions, key_mask):
    """Projections, RoPE, scale, scores + ALiBi + causal/padding masks, entmax, output projection."""
    batch, n, _ = x.shape
    heads, kv_heads, dim = layer.n_heads, layer.n_kv_heads, layer.head_dim
    q = (x @ layer.q_proj.weight.T).view(batch, n, heads, dim).transpose(1, 2)
    k = (x @ layer.k_proj.weight.T).view(batch, n, kv_heads, dim).transpose(1, 2)
    v = (x @ layer.v_proj.weight.T).view(batch, n, kv_heads, dim).transpose(1, 2)
    if layer.rope_theta is not None:
        q, k = (
            _rotate_by_hand(q, positions, layer.rope_theta),
            _rotate_by_hand(k, positions, layer.rope_theta),
        )
    if layer.scaling is not None:
        q = q * _scale_by_hand(layer, x, positions + 1)[..., None].to(q.dtype)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
    i = torch.arange(n)
    if layer.alibi_slopes is not None:
        scores = scores + layer.alibi_slopes.view(1, -1, 1, 1) * (i[None, :] - i[:, None])
    keep = (i[None, :] <= i[:, None]) & key_mask[:, None, None, :]
    scores = scores.masked_fill(~keep, float("-inf"))
    alpha = layer.alpha
    if layer.row_map is not None:
        weights = get_row_map(layer.row_map)(scores, dict(layer.row_parameters.items()), **layer.row_options)
    elif isinstance(alpha, torch.Tensor):
        weights = sparsa.entmax(scores, alpha.view(1, -1, 1, 1).expand(batch, -1, n, 1))
    else:
        weights = sparsa.entmax(scores, alpha)
    out = weights @ v
    if layer.gate is not None:
        out = out * torch.sigmoid(x @ layer.gate.weight.T).view(batch, n, heads, -1).transpose(1, 2)
    out = out.transpose(1, 2).reshape(batch, n, heads * dim)
    return out @ layer.o_proj.weight.T


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, "learn"])
def test_module_equals_dense_computation_by_hand(scaling, positions, alpha):
    learn = alpha == "learn"
    layer = SparseAttention(
        48,
        4,
        2,
        alpha=1.3 if learn else alpha,
        learn_alpha=learn,
        scaling=scaling,
        positions=positions,
    ).double()
    _randomize(layer)
    x = torch.randn(2, 23, 48, dtype=torch.float64)
    expected = _dense_by_hand(layer, x, torch.arange(23).expand(2, 23), torch.ones(2, 23, dtype=torch.bool))
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("row_map", [None, *ROW_MAPS])
@pytest.mark.parametrize("gate", [None, "head", "element"])
def test_row_maps_and_gates_equal_dense_computation_by_hand(row_map, gate):
    layer = SparseAttention(48, 4, 2, alpha=1.0, positions="nape", row_map=row_map, gate=gate).double()
    _randomize(layer)
    x = torch.randn(2, 17, 48, dtype=torch.float64)
    expected = _dense_by_hand(layer, x, torch.arange(17).expand(2, 17), torch.ones(2, 17, dtype=torch.bool))
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=1e-9)
    assert len(list(layer.parameters())) == 4 + len(get_row_map(row_map).parameters if row_map else ()) + (
        gate is not None
    )


def test_log_n_and_position_temperature_equal_their_formulas():
    log_n = torch.log1p(torch.tensor([[1.0, 7.0, 999.0]], dtype=torch.float64))
    x = torch.zeros(1, 3, 4, dtype=torch.float64)
    log_scale = make_scaling("log-n", 4, 2, train_length=8)
    position = make_scaling("position-temperature", 4, 2)
    assert not list(log_scale.parameters()) and position.b.item() == 1.5
    for t, n in enumerate([1, 7, 999]):
        for h in range(2):
            assert log_scale(x, log_n)[0, h, t].item() == pytest.approx(max(1, math.log(n) / math.log(8)))
            expected = 1 + math.exp(-math.exp(1.5)) * math.log(n)
            assert position(x, log_n)[0, h, t].item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="train_length > 1"):
        make_scaling("log-n", 4, 2, train_length=1)


@pytest.mark.parametrize("scaling", ["asentmax", "ssmax"])
@pytest.mark.parametrize("positions", ["nape", "rope+alibi"])
def test_left_padded_rows_equal_the_formula_over_real_tokens(scaling, positions):
    layer = SparseAttention(32, 4, alpha=1.5, scaling=scaling, positions=positions).double()
    _randomize(layer)
    x = torch.randn(3, 19, 32, dtype=torch.float64)
    mask = torch.ones(3, 19, dtype=torch.long)
    mask[0, :6] = 0
    mask[2, :1] = 0
    layout = TokenLayout.build(3, 19, 0, mask, x.device)
    expected = _dense_by_hand(layer, x, layout.positions, mask.bool())
    real = mask.bool()
    torch.testing.assert_close(layer(x, layout)[real], expected[real], atol=1e-10, rtol=1e-9)


def test_asentmax_scale_equals_the_formula_for_given_parameters():
    scale = ASEntmaxScale(3, 2)
    with torch.no_grad():
        scale.beta.weight.copy_(torch.tensor([[0.5, -1.0, 0.0], [0.2, 0.1, 0.3]]))
        scale.beta.bias.copy_(torch.tensor([0.1, -0.4]))
        scale.gamma.weight.copy_(torch.tensor([[1.0, 0.0, -0.5], [0.0, 0.7, 0.0]]))
        scale.gamma.bias.copy_(torch.tensor([0.0, 0.2]))
    x = torch.tensor([[[1.0, 2.0, -1.0], [0.5, -0.5, 3.0]]])
    log_n = torch.tensor([[math.log(2.0), math.log(101.0)]])
    got = scale(x, log_n)
    for h, (wb, bb, wg, bg) in enumerate(
        [((0.5, -1.0, 0.0), 0.1, (1.0, 0.0, -0.5), 0.0), ((0.2, 0.1, 0.3), -0.4, (0.0, 0.7, 0.0), 0.2)]
    ):
        for t in range(2):
            xs = x[0, t].tolist()
            beta = math.log1p(math.exp(sum(w * v for w, v in zip(wb, xs, strict=True)) + bb))
            gamma = 2 * math.tanh(sum(w * v for w, v in zip(wg, xs, strict=True)) + bg)
            assert got[0, h, t].item() == pytest.approx(1 + beta * log_n[0, t].item() ** gamma, rel=1e-6)


def test_static_asentmax_ssmax_and_temperature_equal_their_formulas():
    log_n = torch.log1p(torch.tensor([[1.0, 7.0, 999.0]]))
    x = torch.zeros(1, 3, 4)
    static = StaticASEntmaxScale(4, 2)
    with torch.no_grad():
        static.beta_raw.copy_(torch.tensor([0.3, -2.0]))
        static.gamma_raw.copy_(torch.tensor([-0.4, 1.5]))
    ssmax = SSMaxScale(4, 2)
    with torch.no_grad():
        ssmax.s.copy_(torch.tensor([0.5, 2.0]))
    temperature = TemperatureScale(4, 2, inverse_temperature=1.7)
    for t, ln in enumerate(log_n[0].tolist()):
        for h, (b, g, s) in enumerate([(0.3, -0.4, 0.5), (-2.0, 1.5, 2.0)]):
            beta, gamma = math.log1p(math.exp(b)), 2 * math.tanh(g)
            assert static(x, log_n)[0, h, t].item() == pytest.approx(1 + beta * ln**gamma, rel=1e-6)
            assert ssmax(x, log_n)[0, h, t].item() == pytest.approx(s * ln, rel=1e-6)
            assert temperature(x, log_n)[0, h, t].item() == pytest.approx(1.7)


@pytest.mark.parametrize("scaling", ["asentmax", "asentmax-static"])
def test_asentmax_starts_near_one_for_every_row_and_length(scaling):
    layer = SparseAttention(64, 8, scaling=scaling, positions="nope")
    x = torch.randn(4, 300, 64)
    with torch.no_grad():
        scale = layer.query_scale(x, TokenLayout.build(4, 300, 0, None, x.device))
    assert float(scale.min()) >= 1.0 and float(scale.max()) <= 1.11


def test_nape_scales_only_the_nope_heads_unless_told_otherwise():
    x = torch.randn(2, 9, 32)
    layout = TokenLayout.build(2, 9, 0, None, x.device)
    layer = SparseAttention(32, 4, scaling="ssmax", positions="nape")
    scale = layer.query_scale(x, layout)
    assert torch.equal(scale[:, :2], torch.ones(2, 2, 9))
    assert bool((scale[:, 2:] != 1).all())
    every = SparseAttention(32, 4, scaling="ssmax", positions="nape", scaled_heads="all")
    assert bool((every.query_scale(x, layout) != 1).all())
    assert torch.equal(layer.alibi_slopes, torch.tensor([1.0, 0.5, 0.0, 0.0]))


def test_slope_schemes():
    torch.testing.assert_close(alibi_slopes(4, "geometric"), torch.tensor([2**-2, 2**-4, 2**-6, 2**-8]))
    torch.testing.assert_close(alibi_slopes(3, "linear"), torch.tensor([1, 1 / 2, 1 / 3]))
    torch.testing.assert_close(alibi_slopes(3, "exp"), torch.tensor([1, 1 / 2, 1 / 4]))
    layer = SparseAttention(32, 8, positions="nape", alibi_slopes="exp")
    torch.testing.assert_close(layer.alibi_slopes, torch.tensor([1, 1 / 2, 1 / 4, 1 / 8, 0, 0, 0, 0]))


def test_gradients_reach_scaling_parameters_and_learnt_alpha():
    layer = SparseAttention(32, 4, alpha=1.5, learn_alpha=True, scaling="asentmax", positions="nape")
    _randomize(layer)
    layer(torch.randn(2, 17, 32)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    assert bool(((layer.alpha > 1) & (layer.alpha < 2)).all())


def test_gradcheck_through_scaling_and_positions_fp64():
    layer = SparseAttention(
        8, 2, alpha=1.5, learn_alpha=True, scaling="asentmax", positions="rope+nape"
    ).double()
    _randomize(layer)
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scaling": "position-temperature", "gate": "head"},
        {"scaling": "log-n", "scaling_options": {"train_length": 3}, "gate": "element"},
        {"row_map": "elastic-softmax", "scaling": "position-temperature"},
    ],
)
def test_gradcheck_of_the_related_work_s_scalings_gates_and_row_maps_over_every_parameter_fp64(kwargs):
    layer = SparseAttention(8, 2, alpha=1.0, positions="nape", **kwargs).double()
    _randomize(layer)
    x = torch.randn(1, 6, 8, dtype=torch.float64, requires_grad=True)
    names, values = zip(*layer.named_parameters(), strict=True)

    def output(x, *parameters):
        return torch.func.functional_call(layer, dict(zip(names, parameters, strict=True)), (x,))

    assert torch.autograd.gradcheck(output, (x, *(v.detach().requires_grad_() for v in values)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"positions": "yarn"}, "positions"),
        ({"positions": "alibi+nape"}, "positions"),
        ({"positions": "nope+rope"}, "nope"),
        ({"scaling": "focal"}, "scaling"),
        ({"alpha": 0.5}, "alpha"),
        ({"alpha": 1.0, "learn_alpha": True}, "learn_alpha"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"scaled_heads": "some"}, "scaled_heads"),
        ({"alibi_slopes": "cubic", "positions": "alibi"}, "alibi_slopes"),
        ({"backend": "cuda"}, "backend"),
        ({"scaling": "ssmax", "positions": "alibi", "scaled_heads": "nope"}, "scales no head"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseAttention(32, 4, **kwargs)


def test_bad_attention_masks_are_rejected():
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        TokenLayout.build(2, 5, 0, torch.ones(2, 4), torch.device("cpu"))
    holes = torch.tensor([[1, 0, 1, 1]])
    with pytest.raises(ValueError, match="same side"):
        TokenLayout.build(1, 4, 0, holes, torch.device("cpu"))
    with pytest.raises(ValueError, match="only 0 and 1"):
        TokenLayout.build(1, 2, 0, torch.tensor([[2, 1]]), torch.device("cpu"))
