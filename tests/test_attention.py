import math

import pytest
import torch
from torch.autograd import gradcheck

import sparsa
from sparsa.attention import KeyPadding, blocked

ALPHAS = [1.0, 1.25, 1.5, 2.0, "per-head"]


def make(batch, heads, kv_heads, n_q, n_k, dim, dim_v=None, dtype=torch.float32, spread=1.0):
    q = torch.randn(batch, heads, n_q, dim, dtype=dtype) * spread
    k = torch.randn(batch, kv_heads, n_k, dim, dtype=dtype) * spread
    v = torch.randn(batch, kv_heads, n_k, dim_v or dim, dtype=dtype)
    return q, k, v


def head_alpha(alpha, heads, dtype):
    if alpha == "per-head":
        values = (
            torch.linspace(1.0, 2.0, heads, dtype=dtype) if heads > 1 else torch.tensor([1.4], dtype=dtype)
        )
        return values.requires_grad_()
    return alpha


def run_both(q, k, v, alpha, **kwargs):
    """Outputs, stats and gradients of q, k, v (and alpha) for the reference and blocked backends."""
    upstream = None
    results = []
    for backend in ("reference", "blocked"):
        inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        a = alpha.detach().clone().requires_grad_() if isinstance(alpha, torch.Tensor) else alpha
        out, stats = sparsa.attention(*inputs, alpha=a, backend=backend, return_stats=True, **kwargs)
        if upstream is None:
            upstream = torch.randn_like(out)
        leaves = inputs + ([a] if isinstance(a, torch.Tensor) else [])
        grads = torch.autograd.grad((out * upstream).sum(), leaves, allow_unused=True)
        results.append((out, stats, grads))
    return results


def assert_same(results, atol=1e-5):
    (out_ref, stats_ref, grads_ref), (out_blk, stats_blk, grads_blk) = results
    torch.testing.assert_close(out_blk, out_ref, atol=atol, rtol=atol)
    for g_ref, g_blk in zip(grads_ref, grads_blk, strict=True):
        torch.testing.assert_close(g_blk, g_ref, atol=atol, rtol=atol)
    assert (stats_blk.support == stats_ref.support).float().mean() > 0.999
    finite = torch.isfinite(stats_ref.tau)
    assert torch.equal(finite, torch.isfinite(stats_blk.tau))
    torch.testing.assert_close(stats_blk.tau[finite], stats_ref.tau[finite], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_blocked_matches_reference_over_heads_and_masks(alpha, is_causal, kv_heads):
    q, k, v = make(2, 4, kv_heads, 23, 31, 16, dim_v=24)
    assert_same(run_both(q, k, v, head_alpha(alpha, 4, q.dtype), is_causal=is_causal))


@pytest.mark.parametrize("length", [1, 17, 127, 128, 129, 1000])
@pytest.mark.parametrize("alpha", [1.0, 1.5, "per-head"])
def test_blocked_matches_reference_over_lengths(length, alpha, monkeypatch):
    monkeypatch.setattr(blocked, "SCORE_BLOCK_BUDGET", 1 << 12)  # several query blocks even at small sizes
    q, k, v = make(1, 2, 1, length, length, 32, spread=1.5)
    assert_same(run_both(q, k, v, head_alpha(alpha, 2, q.dtype), is_causal=True))


@pytest.mark.parametrize("dim", [16, 64, 128])
def test_head_dims_and_fewer_queries_than_keys(dim, monkeypatch):
    monkeypatch.setattr(blocked, "SCORE_BLOCK_BUDGET", 1 << 10)
    q, k, v = make(2, 4, 2, 40, 130, dim)
    assert_same(run_both(q, k, v, 1.5, is_causal=True))
    assert_same(run_both(q, k, v, 1.25, is_causal=False))


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, "per-head"])
def test_masks_alibi_and_padding(alpha, monkeypatch):
    monkeypatch.setattr(blocked, "SCORE_BLOCK_BUDGET", 1 << 10)
    q, k, v = make(3, 4, 2, 33, 45, 16)
    a = head_alpha(alpha, 4, q.dtype)
    keep = torch.rand(3, 1, 33, 45) > 0.3
    keep[0, 0, 5] = False  # a query that sees nothing
    assert_same(run_both(q, k, v, a, attn_mask=keep))
    additive = torch.randn(1, 4, 1, 45)
    additive[..., :3] = -math.inf
    assert_same(run_both(q, k, v, a, attn_mask=additive, is_causal=True))
    slopes = torch.tensor([[0.5, 0.25, 0.125, 0.0]]).expand(3, 4).contiguous()
    assert_same(run_both(q, k, v, a, alibi_slopes=slopes, is_causal=True))
    for side in ("left", "right"):
        padding = KeyPadding(torch.tensor([45, 20, 0]), side=side)
        results = run_both(q, k, v, a, attn_mask=padding, alibi_slopes=slopes[0], is_causal=True)
        assert_same(results)
        out, _, grads = results[1]
        assert (out[2] == 0).all() and (grads[0][2] == 0).all()


def test_key_padding_equals_the_explicit_mask():
    q, k, v = make(2, 2, 2, 10, 16, 8)
    lengths = torch.tensor([16, 9])
    positions = torch.arange(16)
    for side in ("left", "right"):
        keep = positions < lengths.view(2, 1) if side == "right" else positions >= 16 - lengths.view(2, 1)
        by_lengths = sparsa.attention(q, k, v, attn_mask=KeyPadding(lengths, side), backend="blocked")
        by_mask = sparsa.attention(q, k, v, attn_mask=keep.view(2, 1, 1, 16), backend="reference")
        torch.testing.assert_close(by_lengths, by_mask)


def test_causal_queries_align_to_the_end_of_the_keys():
    q, k, v = make(1, 2, 2, 12, 12, 8)
    full = sparsa.attention(q, k, v, is_causal=True)
    for start in (0, 5, 11):
        chunk = sparsa.attention(q[:, :, start:], k, v, is_causal=True)
        torch.testing.assert_close(chunk, full[:, :, start:])


def test_alpha_one_matches_torch_sdpa():
    q, k, v = make(2, 4, 4, 30, 30, 16)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    for backend in ("reference", "blocked"):
        got = sparsa.attention(q, k, v, alpha=1.0, is_causal=True, backend=backend)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 1.3])
def test_gradcheck_fp64(alpha):
    q, k, v = (t.requires_grad_() for t in make(1, 2, 1, 5, 7, 4, dtype=torch.float64))
    slopes = torch.tensor([0.3, 0.0], dtype=torch.float64)
    assert gradcheck(
        lambda a, b, c: sparsa.attention(
            a, b, c, alpha=alpha, is_causal=True, alibi_slopes=slopes, backend="blocked"
        ),
        (q, k, v),
    )
    per_head = torch.tensor([1.2, 1.7], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, h: sparsa.attention(a, k, v, alpha=h, backend="blocked"), (q, per_head))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    q, k, v = make(1, 2, 1, 20, 20, 16)
    expected = sparsa.attention(q, k, v, is_causal=True, backend="reference")
    halves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = sparsa.attention(*halves, is_causal=True, backend="blocked")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    out.sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in halves)


def test_long_single_head_stays_within_a_memory_budget():
    n = 16384
    q, k, v = make(1, 1, 1, n, n, 32, spread=1.5)
    q.requires_grad_()
    out, stats = sparsa.attention(q, k, v, is_causal=True, backend="blocked", return_stats=True)
    # The dense path would hold (Nq, Nk) fp32 scores, weights and gradients: 1 GiB each.
    assert blocked.query_block_size(1, 1, n) * n * 4 <= 2**26
    assert stats.skipped_fraction > 0.45
    probe = torch.tensor([0, 1, 4000, n - 1])
    expected = sparsa.attention(
        q[:, :, probe].detach(),
        k[:, :, :],
        v,
        backend="reference",
        attn_mask=(torch.arange(n).view(1, -1) <= probe.view(-1, 1)).view(1, 1, 4, n),
    )
    torch.testing.assert_close(out[:, :, probe].detach(), expected, atol=1e-5, rtol=1e-5)
    out[:, :, probe].sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"alpha": 0.5}, ValueError),
        ({"alpha": torch.tensor([1.5, 1.5, 1.5])}, ValueError),
        ({"alpha": "1.5"}, TypeError),
        ({"scale": -1.0}, ValueError),
        ({"backend": "flash"}, ValueError),
        ({"alibi_slopes": torch.ones(3)}, ValueError),
        ({"attn_mask": torch.ones(2, 4, 5, 7)}, ValueError),
        ({"attn_mask": torch.ones(5, 6, dtype=torch.long)}, TypeError),
        ({"attn_mask": KeyPadding(torch.tensor([1, 9]))}, ValueError),
        ({"is_causal": 1}, TypeError),
        ({"dropout_p": 1.0}, ValueError),
        ({"dropout_p": -0.1}, ValueError),
    ],
)
def test_bad_arguments(kwargs, error):
    q, k, v = make(2, 4, 2, 5, 6, 8)
    with pytest.raises(error):
        sparsa.attention(q, k, v, **kwargs)


@pytest.mark.parametrize("backend", ["blocked", "reference"])
def test_dropout_drops_weights_as_torch_does(backend):
    q, k, v = make(2, 4, 2, 5, 7, 8)
    torch.manual_seed(11)
    out = sparsa.attention(q, k, v, alpha=1.5, is_causal=True, dropout_p=0.3, backend=backend)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(8)).masked_fill(
        torch.ones(5, 7, dtype=torch.bool).tril(2).logical_not(), -math.inf
    )
    torch.manual_seed(11)
    dropped = torch.nn.functional.dropout(sparsa.entmax(scores, 1.5, dim=-1), 0.3)
    torch.testing.assert_close(out, dropped @ v.repeat_interleave(2, 1))
    assert not torch.allclose(out, sparsa.attention(q, k, v, alpha=1.5, is_causal=True))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("n_q", "n_k"), [(9, 9), (1, 9), (4, 9)])
def test_a_causal_mask_over_padded_keys_becomes_key_padding(side, n_q, n_k):
    lengths = torch.tensor([n_k, 0, 3, 7])
    keys = torch.arange(n_k)
    real = keys < lengths[:, None] if side == "right" else keys >= n_k - lengths[:, None]
    causal = keys[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)
    mask = (real[:, None, :] & causal[None])[:, None]
    padding = KeyPadding.of_causal_mask(mask)
    assert padding is not None and padding.side == side and torch.equal(padding.lengths, lengths)
    q, k, v = make(4, 2, 1, n_q, n_k, 8)
    torch.testing.assert_close(
        sparsa.attention(q, k, v, is_causal=True, attn_mask=padding),
        sparsa.attention(q, k, v, attn_mask=mask),
    )


def test_other_masks_do_not_become_key_padding():
    causal = torch.ones(4, 9, dtype=torch.bool).tril()  # queries at the start of the keys (a static cache)
    assert KeyPadding.of_causal_mask(causal[None, None]) is None
    full = torch.ones(1, 1, 9, 9, dtype=torch.bool).tril()
    assert KeyPadding.of_causal_mask(full) is not None
    holes = full.clone()
    holes[..., 5, 2] = False
    assert KeyPadding.of_causal_mask(holes) is None
    assert KeyPadding.of_causal_mask(full.expand(1, 2, 9, 9)) is None
    assert KeyPadding.of_causal_mask(torch.zeros(1, 1, 9, 9)) is None


def test_bad_shapes_name_the_argument():
    q, k, v = make(2, 4, 2, 5, 6, 8)
    with pytest.raises(ValueError, match="heads of q"):
        sparsa.attention(q, k[:, :1].expand(2, 3, 6, 8), v[:, :1].expand(2, 3, 6, 8))
    with pytest.raises(ValueError, match="head_dim"):
        sparsa.attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="is_causal"):
        sparsa.attention(q, k[:, :, :3], v[:, :, :3], is_causal=True)
    with pytest.raises(TypeError, match="dtype"):
        sparsa.attention(q, k.double(), v)
    with pytest.raises(ValueError, match="q must have shape"):
        sparsa.attention(q[0], k, v)
