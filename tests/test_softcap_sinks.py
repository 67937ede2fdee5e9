"""Soft-capped scores and attention sinks against the dense definition, in every backend and decode."""

import pytest
import torch
from torch.autograd import gradcheck

import sparsa
from sparsa.attention import KeyPadding, PagedKVCache, attention_weights, blocked, decode
from test_attention import assert_same, head_alpha, make, run_both

SINKS = torch.tensor([0.5, 3.0, -1.0, 1.5])


def by_definition(q, k, v, alpha, softcap=None, sinks=None, is_causal=True, alibi_slopes=None):
    """Output (B, H, Nq, Dv) written out: capped scores, biases, the sink column, entmax, drop the sink."""
    heads, n_q, n_k = q.shape[1], q.shape[2], k.shape[2]
    group = heads // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    q_pos = torch.arange(n_q).view(-1, 1) + n_k - n_q
    k_pos = torch.arange(n_k).view(1, -1)
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.view(1, heads, 1, 1) * (k_pos - q_pos)
    if is_causal:
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.view(1, heads, 1, 1).expand(*scores.shape[:3], 1)], -1)
    a = alpha.view(1, -1, 1, 1) if isinstance(alpha, torch.Tensor) else alpha
    weights = sparsa.entmax(scores, a, dim=-1)
    return weights[..., :n_k] @ v


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0])
@pytest.mark.parametrize(("softcap", "sinks"), [(2.0, None), (None, SINKS), (1.5, SINKS)])
def test_the_reference_is_the_definition(alpha, softcap, sinks):
    torch.manual_seed(0)
    q, k, v = make(2, 4, 2, 9, 13, 8, dtype=torch.float64, spread=2.0)
    slopes = torch.tensor([0.5, 0.1, 0.0, 0.0], dtype=q.dtype)
    sinks = None if sinks is None else sinks.double()
    options = dict(alpha=alpha, softcap=softcap, sinks=sinks, is_causal=True, alibi_slopes=slopes)
    got = sparsa.attention(q, k, v, backend="reference", **options)
    torch.testing.assert_close(got, by_definition(q, k, v, **options))


PADDINGS = {
    "none": None,
    "right": KeyPadding(torch.tensor([150, 97]), "right"),
    "left": KeyPadding(torch.tensor([150, 61]), "left"),
}


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, "per-head"])
@pytest.mark.parametrize(("softcap", "with_sinks"), [(3.0, False), (None, True), (2.0, True)])
@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("window", [None, 20])
def test_blocked_matches_the_reference(alpha, softcap, with_sinks, padding, window):
    torch.manual_seed(1)
    q, k, v = make(2, 4, 2, 150, 150, 8, dtype=torch.float64, spread=2.0)
    sinks = SINKS.double().requires_grad_() if with_sinks else None
    options = dict(
        alpha=head_alpha(alpha, 4, q.dtype), softcap=softcap, sinks=sinks, is_causal=True,
        window=window, attn_mask=PADDINGS[padding],
    )  # fmt: skip
    assert_same(run_both(q, k, v, **options))
    if sinks is not None:
        grads = []
        for backend in ("reference", "blocked"):
            out = sparsa.attention(q, k, v, backend=backend, **options)
            grads.append(torch.autograd.grad(out.square().sum(), sinks)[0])
        torch.testing.assert_close(grads[1], grads[0])
        assert bool((grads[0] != 0).any())


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(blocked, "KEY_BLOCK", 8)
    monkeypatch.setattr(blocked, "MIN_BOUNDED_KEYS", 32)
    monkeypatch.setattr(blocked, "SCORE_BLOCK_BUDGET", 1 << 11)


@pytest.mark.parametrize(("softcap", "with_sinks"), [(4.0, False), (None, True), (4.0, True)])
@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_block_bounds_hold_under_caps_and_sinks(small_blocks, softcap, with_sinks, alpha):
    """Steep ALiBi heads rule blocks out; the outputs, gradients and support stay the reference's."""
    torch.manual_seed(2)
    q, k, v = make(2, 4, 2, 150, 150, 8, dtype=torch.float64, spread=1.5)
    slopes = torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=q.dtype)
    sinks = SINKS.double() * 4 if with_sinks else None
    options = dict(alpha=alpha, softcap=softcap, sinks=sinks, is_causal=True, alibi_slopes=slopes)
    assert_same(run_both(q, k, v, **options))
    _, stats = sparsa.attention(q, k, v, backend="blocked", return_stats=True, **options)
    assert bool((stats.unscored_key_blocks[:2] > 0).all())


def test_gradcheck_fp64(small_blocks):
    torch.manual_seed(3)
    q, k, v = (t.requires_grad_() for t in make(1, 2, 1, 40, 40, 4, dtype=torch.float64, spread=2.0))
    alpha = torch.tensor([1.3, 1.7], dtype=torch.float64, requires_grad=True)
    sinks = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)

    def run(q, k, v, alpha, sinks):
        return sparsa.attention(
            q, k, v, alpha=alpha, sinks=sinks, softcap=1.5, is_causal=True, window=30, backend="blocked"
        )

    assert gradcheck(run, (q, k, v, alpha, sinks), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "blocked"])
def test_a_large_sink_takes_a_whole_entmax_row(backend):
    q, k, v = make(1, 4, 2, 6, 6, 8)
    sinks = torch.full((4,), 50.0)
    out, stats = sparsa.attention(q, k, v, alpha=1.5, sinks=sinks, backend=backend, return_stats=True)
    assert bool((out == 0).all()) and bool((stats.support == 0).all())
    softmax = sparsa.attention(q, k, v, alpha=1.0, sinks=sinks, backend=backend)
    assert 0 < float(softmax.abs().max()) < 1e-15


@pytest.mark.parametrize("backend", ["reference", "blocked"])
def test_absent_options_are_today_s_attention(backend):
    q, k, v = make(2, 4, 2, 7, 9, 8)
    plain = sparsa.attention(q, k, v, is_causal=True, backend=backend)
    hidden_sink = sparsa.attention(
        q, k, v, is_causal=True, sinks=torch.full((4,), float("-inf")), backend=backend
    )
    torch.testing.assert_close(hidden_sink, plain, atol=0, rtol=0)
    wide_cap = sparsa.attention(q, k, v, is_causal=True, softcap=1e6, backend=backend)
    torch.testing.assert_close(wide_cap, plain)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (dict(softcap=0.0), ValueError, "softcap must be a positive finite number"),
        (dict(softcap=float("nan")), ValueError, "softcap must be a positive finite number"),
        (dict(softcap=True), ValueError, "softcap must be a positive finite number"),
        (dict(sinks=torch.zeros(3)), ValueError, r"sinks must have shape \(4,\)"),
        (dict(sinks=torch.zeros(4, dtype=torch.long)), TypeError, "sinks must be a floating-point tensor"),
        (dict(sinks=torch.zeros(4), row_map="softpick"), ValueError, "row map 'softpick' takes none"),
    ],
)
def test_bad_options_name_the_argument(options, error, message):
    q, k, v = make(1, 4, 2, 5, 5, 8)
    with pytest.raises(error, match=message):
        sparsa.attention(q, k, v, **options)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0])
@pytest.mark.parametrize(("softcap", "with_sinks"), [(3.0, False), (None, True), (30.0, True)])
@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("dense_below", [0, 10_000])
def test_decode_matches_attention(alpha, softcap, with_sinks, window, dense_below):
    torch.manual_seed(4)
    q, k, v = make(2, 4, 2, 2, 600, 16, spread=2.0)
    k[:, :, -30] = 3 * q[:, ::2, -1]
    cache = PagedKVCache(2, 2, 16, page_size=8)
    cache.append(k, v)
    options = dict(alpha=alpha, softcap=softcap, sinks=SINKS * 4 if with_sinks else None, window=window)
    out = decode(q, cache, dense_below=dense_below, **options)
    expected = sparsa.attention(q, k, v, is_causal=True, backend="reference", **options)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_decode_of_left_padded_rows_with_sinks():
    torch.manual_seed(5)
    q, k, v = make(2, 4, 2, 1, 300, 16, spread=2.0)
    padding = KeyPadding(torch.tensor([300, 90]), "left")
    cache = PagedKVCache(2, 2, 16, page_size=8)
    cache.append(k, v, padding)
    out = decode(q, cache, alpha=1.5, sinks=SINKS, softcap=5.0, dense_below=0)
    expected = sparsa.attention(
        q, k, v, alpha=1.5, sinks=SINKS, softcap=5.0, is_causal=True, attn_mask=padding, backend="reference"
    )
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_attention_weights_are_what_the_values_get():
    torch.manual_seed(6)
    q, k, v = make(2, 4, 2, 9, 13, 8, dtype=torch.float64, spread=2.0)
    options = dict(alpha=1.5, is_causal=True, window=6, softcap=2.0, sinks=SINKS.double())
    weights = attention_weights(q, k, **options)
    assert weights.shape == (2, 4, 9, 13)
    torch.testing.assert_close(weights @ v.repeat_interleave(2, 1), sparsa.attention(q, k, v, **options))
    assert bool((weights.sum(-1) < 1 + 1e-12).all()) and bool((weights == 0).any())
