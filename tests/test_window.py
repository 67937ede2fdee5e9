"""Sliding windows: ``window=W`` against the dense reference with the window written as a mask."""

import pytest
import torch
from torch.autograd import gradcheck

import sparsa
from sparsa.attention import KeyPadding, PagedKVCache, blocked, decode
from test_attention import assert_same, head_alpha, make, run_both


def window_mask(n_q, n_k, window):
    """(Nq, Nk) bool, straight from the definition: query i at position Nk - Nq + i keeps the keys
    j with position - window < j <= position."""
    q_pos = torch.arange(n_q).view(-1, 1) + n_k - n_q
    k_pos = torch.arange(n_k).view(1, -1)
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


def padding_mask(padding, n_k):
    """(B, 1, 1, Nk) bool of the real keys of a KeyPadding."""
    k_pos = torch.arange(n_k).view(1, -1)
    lengths = padding.lengths.view(-1, 1)
    real = k_pos < lengths if padding.side == "right" else k_pos >= n_k - lengths
    return real.view(-1, 1, 1, n_k)


def masked_reference(q, k, v, window, padding=None, **options):
    mask = window_mask(q.shape[2], k.shape[2], window).view(1, 1, q.shape[2], -1)
    if padding is not None:
        mask = mask & padding_mask(padding, k.shape[2])
    return sparsa.attention(q, k, v, attn_mask=mask, backend="reference", **options)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, "per-head"])
@pytest.mark.parametrize(
    ("n_q", "n_k", "window"), [(37, 37, 5), (9, 37, 4), (1, 37, 8), (80, 80, 1), (33, 50, 20)]
)
def test_reference_window_is_the_masked_reference(alpha, n_q, n_k, window):
    torch.manual_seed(0)
    q, k, v = make(2, 4, 2, n_q, n_k, 8, dtype=torch.float64)
    a = head_alpha(alpha, 4, q.dtype)
    slopes = torch.tensor([0.5, 0.1, 0.0, 0.0], dtype=q.dtype)
    got = sparsa.attention(
        q, k, v, alpha=a, is_causal=True, window=window, alibi_slopes=slopes, backend="reference"
    )
    expected = masked_reference(q, k, v, window, alpha=a, alibi_slopes=slopes)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


PADDINGS = {
    "none": None,
    "right": KeyPadding(torch.tensor([150, 97]), "right"),
    "left": KeyPadding(torch.tensor([150, 61]), "left"),
}


@pytest.mark.parametrize("alpha", [1.0, 1.5, "per-head"])
@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize(("n_q", "window"), [(150, 7), (150, 64), (40, 30), (1, 16)])
@pytest.mark.parametrize("kv_heads", [1, 4])
def test_blocked_matches_the_reference(alpha, padding, n_q, window, kv_heads):
    torch.manual_seed(1)
    q, k, v = make(2, 4, kv_heads, n_q, 150, 8, dtype=torch.float64)
    options = dict(
        alpha=head_alpha(alpha, 4, q.dtype), is_causal=True, window=window, attn_mask=PADDINGS[padding]
    )
    assert_same(run_both(q, k, v, **options))
    expected = masked_reference(q, k, v, window, PADDINGS[padding], alpha=options["alpha"])
    torch.testing.assert_close(sparsa.attention(q, k, v, backend="blocked", **options), expected)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(blocked, "KEY_BLOCK", 8)
    monkeypatch.setattr(blocked, "MIN_BOUNDED_KEYS", 32)
    monkeypatch.setattr(blocked, "SCORE_BLOCK_BUDGET", 1 << 11)


@pytest.mark.parametrize("window", [3, 20, 70])
@pytest.mark.parametrize("padding", list(PADDINGS))
def test_block_bounds_and_windows_together(small_blocks, window, padding):
    """With the block bounds on, a window rules blocks out before any bound is computed."""
    torch.manual_seed(2)
    q, k, v = make(2, 4, 2, 150, 150, 8, dtype=torch.float64, spread=1.5)
    slopes = torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=q.dtype)
    options = dict(alpha=1.5, is_causal=True, window=window, alibi_slopes=slopes, attn_mask=PADDINGS[padding])
    assert_same(run_both(q, k, v, **options))
    _, stats = sparsa.attention(q, k, v, backend="blocked", return_stats=True, **options)
    assert bool((stats.unscored_key_blocks > 0).all())


def test_the_blocked_backend_scores_only_the_window():
    """O(N W): the share of (query, key) entries scored is about W / N, not 1/2 as for causal."""
    q, k, v = make(1, 2, 1, 4096, 4096, 16)
    _, stats = sparsa.attention(q, k, v, is_causal=True, window=64, backend="blocked", return_stats=True)
    _, causal = sparsa.attention(q, k, v, is_causal=True, backend="blocked", return_stats=True)
    assert 1 - stats.skipped_fraction < 0.1 < 0.45 < 1 - causal.skipped_fraction
    assert bool((stats.support <= 64).all())


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("n_k", [10, 11, 40])
def test_a_window_as_long_as_the_keys_is_plain_causal_attention(backend, n_k):
    q, k, v = make(2, 4, 2, 10, n_k, 8)
    got = sparsa.attention(q, k, v, is_causal=True, window=n_k, backend=backend)
    expected = sparsa.attention(q, k, v, is_causal=True, backend=backend)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_gradcheck_fp64_with_a_window(small_blocks):
    torch.manual_seed(3)
    q, k, v = (t.requires_grad_() for t in make(1, 2, 1, 40, 40, 4, dtype=torch.float64))
    alpha = torch.tensor([1.3, 1.7], dtype=torch.float64, requires_grad=True)

    def run(q, k, v, alpha):
        return sparsa.attention(q, k, v, alpha=alpha, is_causal=True, window=9, backend="blocked")

    assert gradcheck(run, (q, k, v, alpha), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["topk-softmax", "stick-breaking", "softpick"])
def test_row_maps_see_only_the_window(name):
    torch.manual_seed(4)
    q, k, v = make(1, 2, 1, 30, 30, 8, dtype=torch.float64)
    options = dict(row_map=name, is_causal=True)
    got = sparsa.attention(q, k, v, window=6, backend="blocked", **options)
    expected = masked_reference(q, k, v, 6, **options)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(window=0, is_causal=True), "window must be a positive integer"),
        (dict(window=True, is_causal=True), "window must be a positive integer"),
        (dict(window=2.5, is_causal=True), "window must be a positive integer"),
        (dict(window=4), "window needs is_causal=True"),
    ],
)
def test_bad_windows_name_the_argument(options, message):
    q, k, v = make(1, 2, 1, 5, 5, 8)
    with pytest.raises(ValueError, match=message):
        sparsa.attention(q, k, v, **options)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("n_q", "window"), [(12, 4), (1, 4), (12, 20)])
def test_windowed_masks_over_padded_keys_become_key_padding(side, n_q, window):
    lengths = torch.tensor([12, 7])
    padding = KeyPadding(lengths, side)
    mask = window_mask(n_q, 12, window).view(1, 1, n_q, 12) & padding_mask(padding, 12)
    found = KeyPadding.of_causal_mask(mask, window)
    assert found is not None
    # The lengths may count only the keys some window reaches: the masks are what must agree.
    rebuilt = window_mask(n_q, 12, window).view(1, 1, n_q, 12) & padding_mask(found, 12)
    assert torch.equal(rebuilt, mask)
    holed = mask.clone()
    holed[0, 0, -1, -2] = False  # a key hidden between two the last query sees: not padding
    assert KeyPadding.of_causal_mask(holed, window) is None


def paged(k, v, padding=None, page_size=8):
    cache = PagedKVCache(k.shape[0], k.shape[1], k.shape[3], page_size=page_size)
    cache.append(k, v, padding)
    return cache


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, "per-head"])
@pytest.mark.parametrize("n_q", [1, 3])
@pytest.mark.parametrize("window", [5, 40, 300])
@pytest.mark.parametrize("dense_below", [0, 10_000])
def test_decode_with_a_window_matches_attention(alpha, n_q, window, dense_below):
    torch.manual_seed(5)
    q, k, v = make(2, 4, 2, n_q, 400, 16, spread=2.0)
    k[:, :, -20] = 3 * q[:, ::2, -1]  # a sharp key inside every window longer than 20
    a = head_alpha(alpha, 4, torch.float32)
    a = a.detach() if isinstance(a, torch.Tensor) else a
    out, stats = decode(q, paged(k, v), alpha=a, window=window, dense_below=dense_below, return_stats=True)
    expected = sparsa.attention(q, k, v, alpha=a, is_causal=True, window=window, backend="reference")
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    pages_in_window = (window + n_q - 1) // 8 + 2
    assert bool((stats.pages_visible <= pages_in_window).all())
    assert bool((stats.pages_read <= stats.pages_visible).all())


@pytest.mark.parametrize("side", ["left", "right"])
def test_decode_with_a_window_over_rows_of_different_lengths(side):
    torch.manual_seed(6)
    q, k, v = make(2, 4, 2, 1, 300, 16, spread=2.0)
    padding = KeyPadding(torch.tensor([300, 130]), side)
    cache = paged(k, v, padding)
    for dense_below in (0, 10_000):
        out = decode(q, cache, alpha=1.5, window=50, dense_below=dense_below)
        for row, length in enumerate(padding.lengths.tolist()):
            keys = slice(0, length) if side == "right" else slice(300 - length, 300)
            expected = sparsa.attention(
                q[row : row + 1], k[row : row + 1, :, keys], v[row : row + 1, :, keys],
                alpha=1.5, is_causal=True, window=50, backend="reference",
            )  # fmt: skip
            torch.testing.assert_close(out[row : row + 1], expected, atol=2e-5, rtol=2e-5)


def test_decode_refuses_a_bad_window():
    q, k, v = make(1, 2, 1, 1, 20, 8)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        decode(q, paged(k, v), window=0)
