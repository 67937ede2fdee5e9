"""Certified block skipping in the blocked backend: key blocks proven zero are never scored.

Every case runs with small key and query blocks so that bounds act at test
sizes, against the dense reference (values, gradients, support), and checks
the certificate itself: no block left unscored holds weight.
"""

import pytest
import torch
from torch.autograd import gradcheck

import sparsa
from sparsa.attention import KeyPadding, blocked
from test_attention import assert_same, head_alpha, make, run_both


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(blocked, "KEY_BLOCK", 8)
    monkeypatch.setattr(blocked, "MIN_BOUNDED_KEYS", 32)
    monkeypatch.setattr(blocked, "SCORE_BLOCK_BUDGET", 1 << 11)
    monkeypatch.setattr(blocked, "MIN_BOUNDED_QUERY_BLOCKS", 1)
    monkeypatch.setattr(blocked, "BAND", 16)


def tiny_blocks(monkeypatch, size, budget, band=None):
    """Key and query blocks of ``size``, bounds from 8 keys on, ``budget`` score entries per query
    block and, if given, band blocks of ``band`` rows: small enough for gradcheck."""
    monkeypatch.setattr(blocked, "KEY_BLOCK", size)
    monkeypatch.setattr(blocked, "MIN_QUERY_BLOCK", size)
    monkeypatch.setattr(blocked, "MIN_BOUNDED_KEYS", 8)
    monkeypatch.setattr(blocked, "SCORE_BLOCK_BUDGET", budget)
    if band is not None:
        monkeypatch.setattr(blocked, "BAND", band)


def scored_keys(out, n_q, n_k):
    """(B * Hkv, Nq, Nk) bool: which (query, key) scores the forward computed, read from its plan
    and the (unit, block) pairs its band did."""
    plans, band_pairs = out.grad_fn.layout_args[3:]
    units = out.grad_fn.saved_tensors[1].shape[0] * out.grad_fn.saved_tensors[1].shape[1]
    scored = torch.zeros(units, n_q, n_k, dtype=torch.bool)
    for unit, block in [] if band_pairs is None else band_pairs.tolist():
        rows = slice(block * blocked.BAND, (block + 1) * blocked.BAND)
        window_start = n_k - n_q + (block - 1) * blocked.BAND
        scored[unit, rows, max(0, window_start) : window_start + 2 * blocked.BAND] = True
    for start, end, keys, buckets in plans:
        for bucket in buckets:
            if bucket.blocks is None:
                chosen = range(units) if bucket.units is None else bucket.units.tolist()
                for unit in chosen:
                    scored[unit, start:end, bucket.first : keys] = True
                continue
            for unit, positions in zip(bucket.units.tolist(), bucket.positions(keys), strict=True):
                scored[unit, start:end, positions[positions >= 0]] = True
    return scored


def unscored_weight(q, k, v, **kwargs):
    """The largest reference weight on a (query, key) pair that the blocked forward never scored."""
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = sparsa.attention(*inputs, backend="blocked", **kwargs)
    scored = scored_keys(out, q.shape[2], k.shape[2])
    batch, heads, n_q, _ = q.shape
    group = heads // k.shape[1]
    scored = (
        scored.view(batch, k.shape[1], 1, n_q, -1)
        .expand(-1, -1, group, -1, -1)
        .reshape(batch, heads, n_q, -1)
    )
    reference = sparsa.attention(q, k, v, backend="reference", return_stats=True, **kwargs)
    weights = reference_weights(q, k, **kwargs)
    return float(weights.masked_fill(scored, 0).max()), scored, reference


def reference_weights(q, k, alpha=1.5, is_causal=False, attn_mask=None, alibi_slopes=None):
    """Dense entmax weights (B, H, Nq, Nk), straight from the definition."""
    heads, n_q, n_k = q.shape[1], q.shape[2], k.shape[2]
    k = k.repeat_interleave(heads // k.shape[1], 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    q_pos = torch.arange(n_q).view(-1, 1) + n_k - n_q
    k_pos = torch.arange(n_k).view(1, -1)
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.view(-1, heads, 1, 1) * (k_pos - q_pos)
    if is_causal:
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    if isinstance(attn_mask, KeyPadding):
        lengths = attn_mask.lengths.view(-1, 1, 1, 1)
        pad = k_pos >= lengths if attn_mask.side == "right" else k_pos < n_k - lengths
        scores = scores.masked_fill(pad, float("-inf"))
    elif attn_mask is not None:
        scores = (
            scores.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else scores + attn_mask
        )
    a = alpha.detach().view(1, -1, 1, 1) if isinstance(alpha, torch.Tensor) else alpha
    return sparsa.entmax(scores, a, dim=-1)


STEEP = torch.tensor([2.0, 1.0, 0.5, 0.25])


def to_double(x):
    return x.double() if isinstance(x, torch.Tensor) else x


CASES = {
    "causal": dict(is_causal=True, alibi_slopes=STEEP),
    "bidirectional": dict(is_causal=False, alibi_slopes=STEEP),
    "slopes-zero-on-half": dict(is_causal=True, alibi_slopes=torch.tensor([1.0, 0.5, 0.0, 0.0])),
    "right-padding": dict(
        is_causal=True, alibi_slopes=STEEP, attn_mask=KeyPadding(torch.tensor([150, 97]), "right")
    ),
    "left-padding": dict(
        is_causal=True, alibi_slopes=STEEP, attn_mask=KeyPadding(torch.tensor([150, 61]), "left")
    ),
    "per-batch-slopes": dict(is_causal=True, alibi_slopes=torch.stack([STEEP, STEEP.flip(0)])),
}


@pytest.mark.parametrize("alpha", [1.5, 2.0, "per-head"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_skipping_matches_the_reference_and_never_drops_weight(alpha, case, kv_heads):
    torch.manual_seed(0)
    # fp64: ALiBi scores reach hundreds here, where fp32 rounding alone moves gradients by 1e-4.
    q, k, v = make(2, 4, kv_heads, 150, 150, 8, dtype=torch.float64, spread=1.5)
    a = head_alpha(alpha, 4, q.dtype)
    if isinstance(a, torch.Tensor):
        a = torch.tensor([1.3, 1.5, 1.8, 2.0], dtype=q.dtype, requires_grad=True)
    options = dict(alpha=a, **{name: to_double(x) for name, x in CASES[case].items()})
    assert_same(run_both(q, k, v, **options))
    largest, scored, _ = unscored_weight(q, k, v, **options)
    assert largest == 0
    assert not bool(scored.all()), "the steep heads' bounds ruled out nothing"


def test_chunked_prefill_and_a_single_query():
    torch.manual_seed(1)
    q, k, v = make(1, 4, 2, 40, 200, 8, spread=1.5)
    for rows in (40, 1):
        options = dict(alpha=1.5, is_causal=True, alibi_slopes=STEEP)
        assert_same(run_both(q[:, :, -rows:], k, v, **options))
        largest, scored, _ = unscored_weight(q[:, :, -rows:], k, v, **options)
        assert largest == 0 and not bool(scored.all())


def test_a_few_query_blocks_score_every_key_without_summaries(monkeypatch):
    """Below MIN_BOUNDED_QUERY_BLOCKS query blocks the key summaries would cost more than they save."""
    torch.manual_seed(1)
    q, k, v = make(1, 4, 2, 80, 200, 8, spread=1.5)
    options = dict(alpha=1.5, is_causal=True, alibi_slopes=STEEP)
    for rows, skips in ((1, False), (3 * blocked.MIN_QUERY_BLOCK, False), (80, True)):
        rows_q = q[:, :, -rows:]
        monkeypatch.setattr(blocked, "MIN_BOUNDED_QUERY_BLOCKS", 10**9)
        every = int(unscored_weight(rows_q, k, v, **options)[1].sum())
        monkeypatch.setattr(blocked, "MIN_BOUNDED_QUERY_BLOCKS", 4)
        assert_same(run_both(rows_q, k, v, **options))
        largest, scored, _ = unscored_weight(rows_q, k, v, **options)
        assert largest == 0 and (int(scored.sum()) < every) == skips


def test_masks_enter_the_bounds():
    """A float mask may raise scores: its block maxima join the bound; a bool mask hides blocks."""
    torch.manual_seed(2)
    q, k, v = make(1, 4, 4, 120, 120, 8)
    boost = torch.zeros(1, 1, 120, 120)
    boost[..., 3] = 50.0  # one far key that every query must keep
    causal = torch.ones(120, 120, dtype=torch.bool).tril()
    for mask in (boost.masked_fill(~causal, float("-inf")), causal.view(1, 1, 120, 120)):
        options = dict(alpha=1.5, attn_mask=mask, alibi_slopes=STEEP)
        assert_same(run_both(q, k, v, **options))
        largest, _, _ = unscored_weight(q, k, v, **options)
        assert largest == 0


def test_ties_at_the_threshold_and_equal_keys():
    """Keys that all score the same: the bound equals the threshold's neighbourhood, nothing is lost."""
    q = torch.ones(1, 4, 100, 8)
    k = torch.ones(1, 4, 100, 8)
    v = torch.randn(1, 4, 100, 8)
    for slopes in (torch.zeros(4), STEEP):
        options = dict(alpha=1.5, is_causal=True, alibi_slopes=slopes)
        assert_same(run_both(q, k, v, **options))
        assert unscored_weight(q, k, v, **options)[0] == 0


def test_trained_like_heads():
    """Keys with large components the queries ignore (loose bounds) beside sharp ALiBi heads."""
    torch.manual_seed(3)
    q, k, v = make(1, 4, 4, 160, 160, 16)
    q[..., 8:] = 0
    k[..., 8:] *= 10
    options = dict(alpha=1.5, is_causal=True, alibi_slopes=torch.tensor([1.0, 0.25, 0.0625, 0.0]))
    assert_same(run_both(q, k, v, **options))
    assert unscored_weight(q, k, v, **options)[0] == 0


def test_gradcheck_fp64_with_blocks_ruled_out(monkeypatch):
    tiny_blocks(monkeypatch, size=2, budget=16)
    torch.manual_seed(4)
    q, k, v = (t.requires_grad_() for t in make(1, 2, 1, 12, 12, 4, dtype=torch.float64))
    slopes = torch.tensor([3.0, 1.0], dtype=torch.float64)
    alpha = torch.tensor([1.5, 1.3], dtype=torch.float64, requires_grad=True)

    def attend(a, b, c, h):
        return sparsa.attention(a, b, c, alpha=h, is_causal=True, alibi_slopes=slopes, backend="blocked")

    _, stats = sparsa.attention(q, k, v, alpha=alpha, is_causal=True, alibi_slopes=slopes, return_stats=True)
    assert bool((stats.unscored_key_blocks > 0).all())
    assert gradcheck(attend, (q, k, v, alpha))


def test_the_statistic_counts_the_blocks_never_scored():
    torch.manual_seed(5)
    q, k, v = make(1, 4, 4, 160, 160, 8)
    slopes = torch.tensor([2.0, 0.5, 0.0, 0.0])
    out, stats = sparsa.attention(
        q.requires_grad_(),
        k,
        v,
        alpha=1.5,
        is_causal=True,
        alibi_slopes=slopes,
        backend="blocked",
        return_stats=True,
    )
    scored = scored_keys(out, 160, 160)
    plans = out.grad_fn.layout_args[3]
    visible = sum(-(-keys // blocked.KEY_BLOCK) for _, _, keys, _ in plans)
    unscored = []
    for unit in range(4):
        never = 0
        for start, end, keys, _ in plans:
            blocks = scored[unit, start:end, :keys].any(0)
            never += int(
                (
                    ~torch.nn.functional.pad(blocks, (0, -keys % blocked.KEY_BLOCK))
                    .view(-1, blocked.KEY_BLOCK)
                    .any(-1)
                ).sum()
            )
        unscored.append(never / visible)
    torch.testing.assert_close(stats.unscored_key_blocks, torch.tensor(unscored))
    assert stats.unscored_key_blocks[0] > 0.6 and stats.unscored_key_blocks[1] > 0.3
    _, softmax_stats = sparsa.attention(
        q, k, v, alpha=1.0, is_causal=True, alibi_slopes=slopes, return_stats=True
    )
    assert bool((softmax_stats.unscored_key_blocks == 0).all())


def test_the_band_finishes_steep_heads_and_only_them():
    """Causal ALiBi heads are done in their windows; a head without a slope never enters the band."""
    torch.manual_seed(6)
    q, k, v = make(2, 4, 4, 160, 160, 8, dtype=torch.float64, spread=1.5)
    options = dict(alpha=1.5, is_causal=True, alibi_slopes=torch.tensor([4.0, 2.0, 0.0, 1.0], dtype=q.dtype))
    assert_same(run_both(q, k, v, **options))
    out = sparsa.attention(q.requires_grad_(), k, v, backend="blocked", **options)
    pairs = out.grad_fn.layout_args[4]
    units = set(pairs[:, 0].tolist())
    assert {0, 1} <= units and not units & {2, 6}, units
    assert unscored_weight(q.detach(), k, v, **options)[0] == 0


def test_gradcheck_fp64_through_the_band(monkeypatch):
    tiny_blocks(monkeypatch, size=4, budget=64, band=4)
    torch.manual_seed(7)
    q, k, v = (t.requires_grad_() for t in make(1, 2, 1, 20, 20, 4, dtype=torch.float64))
    slopes = torch.tensor([3.0, 2.0], dtype=torch.float64)
    alpha = torch.tensor([1.5, 1.3], dtype=torch.float64, requires_grad=True)
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)

    def attend(a, b, c, h, sink):
        return sparsa.attention(
            a, b, c, alpha=h, is_causal=True, alibi_slopes=slopes, sinks=sink, backend="blocked"
        )

    assert attend(q, k, v, alpha, sinks).grad_fn.layout_args[4].shape[0] > 0
    assert gradcheck(attend, (q, k, v, alpha, sinks))
