"""Non-finite inputs, one table through every backend and the decoder: a NaN in is a NaN out.

The contract (docs/design.md): a NaN in a row's scores (from q, k, a float mask) makes that row's
output NaN; a NaN value makes NaN every row that gives its key weight; -inf hides a key, and a row
that sees none is zero; +inf scores behave as in torch's softmax (NaN).
"""

import importlib.util

import pytest
import torch

import sparsa
from sparsa.attention import PagedKVCache, decode
from sparsa.normalize import ROW_MAPS

B, H, N, D = 1, 2, 40, 16
ROW, KEY = 13, 9
BACKENDS = ["reference", "blocked"] + (["triton"] if importlib.util.find_spec("triton") else [])


def _inputs():
    torch.manual_seed(0)
    return [torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3)]


def _mask(value):
    mask = torch.zeros(B, 1, N, N, dtype=torch.float64)
    mask[..., ROW, KEY] = value
    return mask


def _rows(*pairs):
    """(H, N) bool: True at the given (head, query rows) pairs."""
    rows = torch.zeros(H, N, dtype=torch.bool)
    for head, queries in pairs:
        rows[head, queries] = True
    return rows


CASES = {
    # name: (what to poison, the rows that must be NaN)
    "nan in q": ("q", (0, ROW, 5), float("nan"), _rows((0, ROW))),
    "nan in k": ("k", (0, KEY, 1), float("nan"), _rows((0, slice(KEY, N)))),
    "inf in q": ("q", (0, ROW, 5), float("inf"), _rows((0, ROW))),
    "nan in a float mask": ("mask", None, float("nan"), _rows((0, ROW), (1, ROW))),
    "a row of -inf": ("mask", None, -float("inf"), _rows()),
}


def _case(name):
    target, where, value, nan_rows = CASES[name]
    q, k, v = _inputs()
    mask = None
    if target == "mask":
        mask = _mask(value)
        if value == -float("inf"):
            mask[..., ROW, :] = -float("inf")
    else:
        {"q": q, "k": k}[target][(0, *where)] = value
    return q, k, v, mask, nan_rows


def _attend(q, k, v, mask, alpha, backend):
    if mask is None:
        return sparsa.attention(q, k, v, alpha=alpha, is_causal=True, backend=backend)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    return sparsa.attention(
        q, k, v, alpha=alpha, attn_mask=mask.masked_fill(~causal, -torch.inf), backend=backend
    )


def _decode(q, k, v, alpha, max_dropped_mass=0.0):
    cache = PagedKVCache(B, H, D, page_size=4, dtype=torch.float64)
    cache.append(k, v)
    return decode(q, cache, alpha=alpha, dense_below=0, max_dropped_mass=max_dropped_mass)


def _check(out, nan_rows, reference, tolerance=None):
    got = out.isnan().any(-1)[0]
    assert torch.equal(got, nan_rows), (
        f"NaN rows {got.nonzero().tolist()}, expected {nan_rows.nonzero().tolist()}"
    )
    torch.testing.assert_close(out[0][~nan_rows], reference[0][~nan_rows], atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_non_finite_scores_make_their_rows_nan_in_every_backend(name, backend, alpha):
    q, k, v, mask, nan_rows = _case(name)
    if backend == "triton" and (mask is not None or alpha == 1.0):
        pytest.skip("the Triton backend takes no mask tensor and runs softmax in the blocked path")
    out = _attend(q, k, v, mask, alpha, backend)
    tolerance = 2e-5 if backend == "triton" else None  # Triton computes in fp32
    _check(out, nan_rows, _attend(q, k, v, mask, alpha, "reference"), tolerance)
    if name == "a row of -inf":
        assert torch.equal(out[0, :, ROW], torch.zeros_like(out[0, :, ROW]))


@pytest.mark.parametrize("name", list(CASES))
def test_non_finite_scores_match_sdpa_at_alpha_one(name):
    q, k, v, mask, nan_rows = _case(name)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    full = None if mask is None else mask.masked_fill(~causal, -torch.inf)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full, is_causal=mask is None)
    ours = _attend(q, k, v, mask, 1.0, "reference")
    if name == "a row of -inf":
        # torch's math kernel gives a fully masked row zeros as well; the other rows must agree.
        nan_rows = nan_rows | sdpa.isnan().any(-1)[0]
    assert torch.equal(sdpa.isnan().any(-1)[0], nan_rows)
    torch.testing.assert_close(ours[0][~nan_rows], sdpa[0][~nan_rows])


@pytest.mark.parametrize("alpha", [1.0, 1.5])
@pytest.mark.parametrize("name", ["nan in q", "nan in k", "inf in q"])
@pytest.mark.parametrize("max_dropped_mass", [0.0, 1e-3])
def test_the_decoder_never_certifies_a_non_finite_key_or_query_away(name, alpha, max_dropped_mass):
    q, k, v, _, nan_rows = _case(name)
    out = _decode(q, k, v, alpha, max_dropped_mass)
    reference = _attend(q, k, v, None, alpha, "reference")
    if max_dropped_mass:
        assert torch.equal(out.isnan().any(-1)[0], nan_rows)
    else:
        _check(out, nan_rows, reference)


@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_a_nan_key_on_a_page_the_bounds_would_rule_out_is_read(alpha):
    # The key's other entries are tiny, so without the NaN its page would be proven zero.
    q, k, v = _inputs()
    k[0, 0, KEY] = 1e-6
    k[0, 0, KEY, 3] = float("nan")
    out = _decode(q, k, v, alpha)
    assert bool(out[0, 0, KEY:].isnan().any(-1).all())
    assert not bool(out[0, 0, :KEY].isnan().any()) and not bool(out[0, 1].isnan().any())


@pytest.mark.parametrize("backend", [*BACKENDS, "decode"])
@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_a_nan_value_reaches_every_row_that_gives_its_key_weight(backend, alpha):
    if backend == "triton" and alpha == 1.0:
        pytest.skip("softmax runs in the blocked path")
    q, k, v = _inputs()
    weights = sparsa.attention(
        q, k, torch.eye(N, dtype=q.dtype).expand(B, H, N, N), alpha=alpha, is_causal=True
    )
    v[0, 0, KEY, 2] = float("nan")
    out = _decode(q, k, v, alpha) if backend == "decode" else _attend(q, k, v, None, alpha, backend)
    weighted = weights[0, 0, :, KEY] > 0
    nan_rows = out.isnan().any(-1)[0]
    assert bool(nan_rows[0][weighted].all())
    # Rows that give the key no weight may be NaN (a dense product multiplies the zero by the NaN,
    # as torch's kernels do), but the other head never is.
    assert not bool(nan_rows[1].any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_the_backward_of_a_nan_row_is_nan_and_the_other_rows_match_the_reference(backend, alpha):
    if backend == "triton" and alpha == 1.0:
        pytest.skip("softmax runs in the blocked path")
    q, k, v, _, nan_rows = _case("nan in q")
    grads = {}
    for name in ("reference", backend):
        q_leaf = q.clone().requires_grad_()
        out = _attend(q_leaf, k, v, None, alpha, name)
        (grads[name],) = torch.autograd.grad(out, q_leaf, torch.ones_like(out))
    got = grads[backend].isnan().any(-1)[0]
    assert torch.equal(got, nan_rows)
    tolerance = 2e-5 if backend == "triton" else None
    torch.testing.assert_close(
        grads[backend][0][~nan_rows], grads["reference"][0][~nan_rows], atol=tolerance, rtol=tolerance
    )


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("row_map", list(ROW_MAPS))
def test_every_row_map_keeps_a_nan_row_nan(row_map, backend):
    q, k, v, _, nan_rows = _case("nan in q")
    out = sparsa.attention(q, k, v, is_causal=True, row_map=row_map, backend=backend)
    reference = sparsa.attention(q, k, v, is_causal=True, row_map=row_map, backend="reference")
    _check(out, nan_rows, reference)


@pytest.mark.parametrize("scaling", ["asentmax", "ssmax", None])
def test_a_nan_token_reaches_the_layer_output_of_every_later_position(scaling):
    from sparsa.layers import SparseAttention

    torch.manual_seed(0)
    layer = SparseAttention(32, n_heads=4, alpha=1.5, scaling=scaling, positions="nape").double()
    x = torch.randn(2, N, 32, dtype=torch.float64)
    x[0, ROW, 3] = float("nan")
    nan_positions = layer(x).isnan().any(-1)
    # Earlier positions may be NaN too (its value times a zero weight); the other sequence never is.
    assert bool(nan_positions[0, ROW:].all()) and not bool(nan_positions[1].any())


@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("entry", [float("inf"), -float("inf")])
def test_a_page_of_infinite_key_entries_is_never_ruled_out_by_a_sketch(dim, entry):
    """Content heads are bounded by a sketch alone (the 4-bit one from 64 dimensions on); a page whose
    keys have an infinite entry has no finite scale, so no sketch may bound it: +inf or -inf scores
    (by the query's sign there) must come out as the reference gives them."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 1, dim), torch.randn(1, 2, 512, dim), torch.randn(1, 2, 512, dim)
    k[0, :, 32:48] = 1e-6
    k[0, :, 32:48, 3] = entry
    k[0, :, 300] += 4 * q[0, :, 0]
    cache = PagedKVCache(1, 2, dim, page_size=16)
    cache.append(k, v)
    out, stats = decode(q, cache, alpha=1.5, dense_below=0, return_stats=True)
    assert bool((stats.sketched | stats.coarse_sketched).all())
    reference = sparsa.attention(q, k, v, alpha=1.5, is_causal=True, backend="reference")
    assert torch.equal(out.isnan(), reference.isnan())
    torch.testing.assert_close(out.nan_to_num(), reference.nan_to_num(), atol=1e-5, rtol=0)
