"""The paged KV cache and certified sparse decoding against dense attention over the same keys."""

import importlib

import pytest
import torch

import sparsa
from sparsa.attention import KeyPadding, PagedKVCache, decode, sketch_kernels

paged = importlib.import_module("sparsa.attention.paged")


def _fill(keys, values, page_size, chunk=None):
    """A cache holding keys[b] (Hkv, L_b, D), appended ``chunk`` tokens at a time (ragged, right padded)."""
    batch, (kv_heads, _, dim) = len(keys), keys[0].shape
    cache = PagedKVCache(batch, kv_heads, dim, value_dim=values[0].shape[-1], page_size=page_size,
                         dtype=keys[0].dtype)  # fmt: skip
    lengths = torch.tensor([k.shape[1] for k in keys])
    chunk = chunk or max(1, int(lengths.max()))
    done = torch.zeros_like(lengths)
    while bool((done < lengths).any()):
        counts = torch.clamp(lengths - done, 0, chunk)
        k = keys[0].new_zeros(batch, kv_heads, chunk, dim)
        v = values[0].new_zeros(batch, kv_heads, chunk, values[0].shape[-1])
        for b in range(batch):
            c, s = int(counts[b]), int(done[b])
            k[b, :, :c], v[b, :, :c] = keys[b][:, s : s + c], values[b][:, s : s + c]
        cache.append(k, v, KeyPadding(counts, "right"))
        done += counts
    return cache


def _left_padded(rows):
    width = max(r.shape[1] for r in rows)
    out = rows[0].new_zeros(len(rows), rows[0].shape[0], width, rows[0].shape[2])
    for b, r in enumerate(rows):
        out[b, :, width - r.shape[1] :] = r
    return out


def _dense(q, keys, values, **options):
    lengths = torch.tensor([k.shape[1] for k in keys])
    return sparsa.attention(
        q, _left_padded(keys), _left_padded(values), is_causal=True, attn_mask=KeyPadding(lengths, "left"),
        backend="reference", return_stats=True, **options,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _sparse_at_any_length(monkeypatch):
    """The caches here are small: plan sparsely at every length (the default goes dense below 32k keys).

    Set as decode's default, so that the model's paged cache plans too."""
    monkeypatch.setattr(paged.decode, "__kwdefaults__", {**paged.decode.__kwdefaults__, "dense_below": 0})


def test_short_caches_decode_densely_without_bounds(monkeypatch):
    monkeypatch.setattr(paged.decode, "__kwdefaults__", {**paged.decode.__kwdefaults__, "dense_below": 32768})
    torch.manual_seed(9)
    keys, values = (
        [torch.randn(2, 300, 8), torch.randn(2, 40, 8)],
        [torch.randn(2, 300, 8), torch.randn(2, 40, 8)],
    )
    stats = _check(torch.randn(2, 4, 2, 8), keys, values, _fill(keys, values, 16), alpha=1.5)
    assert bool(stats.dense.all()) and torch.equal(stats.pages_read, stats.pages_visible)


@pytest.mark.parametrize("lengths", [[37, 5, 20, 9], [20, 20, 20, 20]], ids=["ragged", "equal"])
def test_dense_decoding_of_the_whole_batch_equals_dense_attention(lengths, monkeypatch):
    """Below dense_below every row is dense; one query per row, or rows of one length, take one call."""
    monkeypatch.setattr(paged.decode, "__kwdefaults__", {**paged.decode.__kwdefaults__, "dense_below": 10**6})
    torch.manual_seed(10)
    heads, kv_heads = 4, 2
    keys = [torch.randn(kv_heads, n, 8) for n in lengths]
    values = [torch.randn(kv_heads, n, 8) for n in lengths]
    cache = _fill(keys, values, page_size=4, chunk=7)
    for n_q in (1, 3):
        for alpha, alibi in (
            (1.5, None),
            (torch.linspace(1.0, 2.0, heads), torch.linspace(0.5, 0.0, heads)),
            (2.0, torch.rand(4, heads)),
        ):
            q = 3 * torch.randn(4, heads, n_q, 8)
            stats = _check(q, keys, values, cache, alpha=alpha, alibi_slopes=alibi)
            assert bool(stats.dense.all())


@pytest.fixture(params=["auto", "sparse", "sparse-one-page-first"])
def path(request, monkeypatch):
    """auto: as shipped; sparse: never the dense path; one page first: the later reads do the work."""
    if request.param != "auto":
        monkeypatch.setattr(paged, "DENSE_SHARE", float("inf"))
    if request.param == "sparse-one-page-first":
        monkeypatch.setattr(paged, "FIRST_GROUP_PAGES", 1)
    return request.param


def _check(q, keys, values, cache, atol=1e-5, **options):
    out, stats = decode(q, cache, return_stats=True, **options)
    # Without stats, a wholly dense plan skips the bookkeeping: the same output either way.
    assert torch.equal(decode(q, cache, **options), out)
    expected, dense_stats = _dense(q, keys, values, **options)
    torch.testing.assert_close(out, expected, atol=atol, rtol=1e-4)
    assert torch.equal(stats.support, dense_stats.support)
    sparse = ~stats.dense
    assert bool((stats.support_pages <= stats.candidate_pages)[sparse].all())
    assert bool((stats.candidate_pages <= stats.pages_read)[sparse].all())
    assert bool((stats.support_pages[stats.dense] == -1).all())
    assert bool((stats.pages_read <= stats.pages_visible).all())
    return stats


@pytest.mark.parametrize("alpha", [1.0, 1.25, 1.5, 2.0, "per-head"])
@pytest.mark.parametrize(("kv_heads", "group"), [(2, 1), (1, 4), (1, 8)])
def test_decode_equals_dense_attention_on_random_ragged_caches(alpha, kv_heads, group, path):
    torch.manual_seed(0)
    heads = kv_heads * group
    if alpha == "per-head":
        alpha = torch.linspace(1.0, 2.0, heads)
    lengths = [37, 5, 0, 20]
    keys = [torch.randn(kv_heads, n, 8) for n in lengths]
    values = [torch.randn(kv_heads, n, 8) for n in lengths]
    cache = _fill(keys, values, page_size=4, chunk=3)
    slopes = torch.linspace(0.5, 0.0, heads)
    for n_q in (1, 3):
        for alibi in (None, slopes):
            q = 3 * torch.randn(4, heads, n_q, 8)
            _check(q, keys, values, cache, alpha=alpha, alibi_slopes=alibi)


def test_single_token_appends_and_one_prefill_give_the_same_cache():
    torch.manual_seed(1)
    keys, values = [torch.randn(2, 23, 8)], [torch.randn(2, 23, 8)]
    one_by_one, prefill = _fill(keys, values, 5, chunk=1), _fill(keys, values, 5)
    for name in ("keys", "values", "key_extremes", "key_codes", "key_scale", "key_code_norm"):
        used = getattr(prefill, name)[:, :, : prefill.pages(0)]
        assert torch.equal(getattr(one_by_one, name)[:, :, : one_by_one.pages(0)], used)
    assert torch.equal(one_by_one.lengths, prefill.lengths)


def test_left_padded_chunks_append_their_real_tokens():
    torch.manual_seed(2)
    k, v = torch.randn(2, 1, 6, 4), torch.randn(2, 1, 6, 4)
    cache = PagedKVCache(2, 1, 4, page_size=4)
    cache.append(k, v, KeyPadding(torch.tensor([6, 2]), "left"))
    assert cache.lengths.tolist() == [6, 2]
    assert torch.equal(cache.dense(0)[0][0], k[0]) and torch.equal(cache.dense(1)[0][0], k[1, :, 4:])


def _adversarial_rows():
    torch.manual_seed(3)
    n, dim = 50, 8
    equal = torch.ones(1, n, dim)
    dominant = torch.randn(1, n, dim) * 0.1
    dominant[0, 17] = 5.0
    spread = torch.randn(1, n, dim) * 1e-3
    tied = torch.zeros(1, n, dim)
    tied[0, ::7, 0] = 1.0
    return {"all keys equal": equal, "one dominant key": dominant, "support on every page": spread,
            "ties at the threshold": tied}  # fmt: skip


@pytest.mark.parametrize("case", list(_adversarial_rows()))
@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_decode_equals_dense_on_adversarial_caches(case, alpha, path):
    keys = [_adversarial_rows()[case]]
    values = [torch.randn(1, keys[0].shape[1], 8)]
    cache = _fill(keys, values, page_size=6)
    q = torch.ones(1, 2, 1, 8)
    _check(q, keys, values, cache, alpha=alpha, alibi_slopes=torch.tensor([0.0, 0.3]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_caches_decode_as_dense_attention_does(dtype, path):
    torch.manual_seed(4)
    keys = [torch.randn(2, n, 16).to(dtype) for n in (40, 33)]
    values = [torch.randn(2, n, 16).to(dtype) for n in (40, 33)]
    cache = _fill(keys, values, page_size=8, chunk=7)
    q = (3 * torch.randn(2, 4, 2, 16)).to(dtype)
    out = decode(q, cache, alpha=1.5)
    expected, _ = _dense(q, keys, values, alpha=1.5)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def _sharp_cache(n=4096, page_size=16, kv_heads=2, dim=32, seed=5):
    """Keys close to their page's centre and queries that match one centre: what min/max bounds certify."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(kv_heads, n // page_size, 1, dim, generator=generator)
    noise = 0.05 * torch.randn(kv_heads, n // page_size, page_size, dim, generator=generator)
    k = (centres + noise).reshape(1, kv_heads, n, dim)
    v = torch.randn(1, kv_heads, n, dim, generator=generator)
    cache = PagedKVCache(1, kv_heads, dim, page_size=page_size)
    cache.append(k, v)
    target = torch.randint(0, n // page_size, (kv_heads,), generator=generator)
    q = 3.0 * centres[torch.arange(kv_heads), target, 0]
    return cache, [k[0]], [v[0]], q[None, :, None, :]


def test_a_sharp_cache_is_decoded_exactly_from_a_few_pages():
    cache, keys, values, q = _sharp_cache()
    stats = _check(q, keys, values, cache, alpha=1.5)
    assert not bool(stats.dense.any())
    assert int(stats.pages_read.max()) < 0.2 * cache.pages(0)
    assert stats.bytes_read < 0.2 * 2 * keys[0].numel() * 4


@pytest.mark.parametrize("dim", [32, 64])
def test_the_sketches_certify_content_heads_that_page_bounds_leave_open(dim):
    torch.manual_seed(8)
    keys, values = [torch.randn(2, 4096, dim)], [torch.randn(2, 4096, dim)]
    cache = _fill(keys, values, page_size=16)
    q = torch.randn(1, 4, 1, dim)
    q[0, :2, 0] = 3 * keys[0][0, 100] + 3 * keys[0][0, 3000]
    stats = _check(q, keys, values, cache, alpha=1.5)
    # Heads 0 and 1 match two keys; heads 2 and 3 have N(0, 1) scores, with a support of a few dozen keys
    # on 15% of the pages, which only the int8 sketch bounds: gathering those for both heads costs more
    # than one dense pass. From 64 dimensions on the 4-bit sketch comes first, and certifies heads 0
    # and 1 alone; below, packing would pad its codes to 64 and the int8 sketch is the only one.
    if dim >= 64:
        assert bool(stats.coarse_sketched.all()) and stats.coarse_sketch_kernel is not None
        assert stats.sketched[0, :, 0].tolist() == [False, False, True, True]
    else:
        assert not bool(stats.coarse_sketched.any()) and bool(stats.sketched.all())
    assert not bool(stats.dense[0, :2].any())
    assert int(stats.pages_read[0, :2].max()) <= 3
    assert bool(stats.candidate_pages[0, 2:].max() < 0.2 * cache.pages(0)) and bool(stats.dense[0, 2:].all())
    codes = cache.key_codes[0, :, : cache.pages(0)].flatten(1, 2).float()
    scale = cache.key_scale[0, :, : cache.pages(0)].repeat_interleave(16, 1)[..., None]
    assert bool(((keys[0] - scale * codes).abs() <= scale / 2 + 1e-7).all())
    nibbles = sketch_kernels.unpack_nibbles(cache.key_nibbles[0, :, : cache.pages(0)]).flatten(1, 2)[
        ..., :dim
    ]
    nibble_scale = cache.key_nibble_scale[0, :, : cache.pages(0)].repeat_interleave(16, 1)[..., None]
    assert int(nibbles.abs().max()) <= 7
    assert bool(((keys[0] - nibble_scale * nibbles.float()).abs() <= nibble_scale / 2 + 1e-6).all())


def test_bytes_read_count_the_keys_values_summaries_and_sketches_read():
    """KV head 0 has ALiBi (page minima and maxima bound it), KV head 1 is a sharp content head (the
    4-bit sketch bounds it): each counts its summaries once, beside the keys and values gathered."""
    torch.manual_seed(2)
    dim, n = 64, 2048
    keys, values = [torch.randn(2, n, dim)], [torch.randn(2, n, dim)]
    cache = _fill(keys, values, page_size=16)
    q = torch.randn(1, 2, 1, dim)
    q[0, 1, 0] = 4 * keys[0][1, 700]
    slopes = torch.tensor([1.0, 0.0])
    stats = _check(q, keys, values, cache, alpha=1.5, alibi_slopes=slopes)
    assert stats.coarse_sketched[0, :, 0].tolist() == [False, True] and not bool(stats.sketched.any())
    pages = cache.pages(0)
    expected = int(stats.keys_read.sum()) * 2 * dim * 4 + pages * 2 * dim * 4 + pages * 16 * dim // 2
    assert stats.bytes_read == expected


def test_a_flat_content_head_is_read_whole_beside_a_sharp_one():
    """KV head 0's keys are all equal (every key in the support), KV head 1 has one strong key: head 0
    decodes densely without bounds, head 1 from a few pages."""
    torch.manual_seed(4)
    dim, n = 64, 4096
    keys = [torch.cat([torch.ones(1, n, dim), torch.randn(1, n, dim)])]
    values = [torch.randn(2, n, dim)]
    keys[0][1, 1234] = 3 * torch.randn(dim)
    cache = _fill(keys, values, page_size=16)
    q = torch.randn(1, 2, 1, dim)
    q[0, 1, 0] = keys[0][1, 1234]
    stats = _check(q, keys, values, cache, alpha=1.5)
    assert stats.dense[0, :, 0].tolist() == [True, False]
    assert not bool(stats.coarse_sketched[0, 0]) and bool(stats.coarse_sketched[0, 1])
    assert int(stats.pages_read[0, 1, 0]) <= 3
    # Head 0 read no page summaries: its keys and values once, head 1 its pages and 4-bit codes.
    per_key = 2 * dim * 4
    expected = (n + int(stats.keys_read[0, 1, 0])) * per_key + cache.pages(0) * 16 * dim // 2
    assert stats.bytes_read == expected


def test_dense_rows_skip_the_sketch():
    keys = [torch.ones(1, 512, 8)]
    cache = _fill(keys, [torch.randn(1, 512, 8)], page_size=16)
    stats = _check(torch.ones(1, 1, 1, 8), keys, [cache.dense(0)[1][0]], cache, alpha=1.5)
    assert not bool(stats.sketched.any()) and bool(stats.dense.all())


def test_softmax_reads_every_page():
    cache, keys, values, q = _sharp_cache(n=256)
    stats = _check(q, keys, values, cache, alpha=1.0)
    assert torch.equal(stats.pages_read, stats.pages_visible)


def test_max_dropped_mass_bounds_what_it_drops(monkeypatch):
    monkeypatch.setattr(paged, "DENSE_SHARE", float("inf"))
    torch.manual_seed(6)
    keys, values = [torch.randn(2, 600, 16)], [torch.randn(2, 600, 16)]
    cache = _fill(keys, values, page_size=8)
    q = 2 * torch.randn(1, 2, 1, 16)
    exact, exact_stats = decode(q, cache, alpha=1.25, return_stats=True)
    assert float(exact_stats.dropped_mass_bound.max()) == 0.0
    for eps in (1e-3, 0.05, 0.3):
        out, stats = decode(q, cache, alpha=1.25, max_dropped_mass=eps, return_stats=True)
        bound = stats.dropped_mass_bound
        assert float(bound.max()) <= eps
        assert bool((stats.pages_read <= exact_stats.pages_read).all())
        # Dropping mass m and renormalising moves the output by at most 2 m max|v|.
        error = (out - exact).abs().amax(-1)
        assert bool((error <= 2 * bound * values[0].abs().max() + 1e-5).all())


def test_bad_input_gets_a_clear_error():
    cache = PagedKVCache(2, 2, 8, page_size=4)
    cache.append(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8))
    q = torch.randn(2, 4, 1, 8)
    cases = [
        (lambda: decode(torch.randn(2, 3, 1, 8), cache), "multiple of 2"),
        (lambda: decode(torch.randn(2, 4, 1, 6), cache), "got (2, 4, 1, 6)"),
        (lambda: decode(torch.randn(2, 4, 6, 8), cache), "6 queries; the cache's longest row holds 5 keys"),
        (lambda: decode(q.double(), cache), "torch.float64"),
        (lambda: decode(q.to("meta"), cache), "meta"),
        (lambda: decode(q, cache, alpha=0.5), "alpha"),
        (lambda: decode(q, cache, max_dropped_mass=1.5), "max_dropped_mass"),
        (lambda: decode(q, cache, alibi_slopes=torch.full((4,), -1.0)), "alibi_slopes"),
        (lambda: cache.append(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 4, 8)), "same number of tokens"),
        (lambda: cache.append(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)), "must have shape"),
        (lambda: cache.append(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8),
                              KeyPadding(torch.tensor([4, 1]))), "padding.lengths"),
        (lambda: PagedKVCache(2, 2, 8, page_size=0), "page_size"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
            call()


@pytest.mark.parametrize(
    "fields",
    [
        {"alpha": 1.5, "scaling": "asentmax", "positions": "nape", "n_kv_heads": 2},
        {"alpha": 1.0, "scaling": "ssmax", "positions": "nape"},
        {"alpha": 2.0, "positions": "rope"},
        {"alpha": 1.25, "learn_alpha": True, "positions": "alibi", "n_kv_heads": 1},
    ],
)
def test_a_paged_cache_gives_the_logits_and_tokens_of_the_dense_cache(fields, path):
    from sparsa.models import Transformer, TransformerConfig

    torch.manual_seed(7)
    config = TransformerConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, **fields)
    model = Transformer(config).eval()
    ids = torch.randint(4, 40, (3, 30))
    mask = torch.ones_like(ids)
    mask[0, :7], mask[2, :29] = 0, 0
    dense, paged = model.new_cache(), model.new_cache(page_size=4)
    step_ids, step_mask = ids, mask
    for _ in range(5):
        expected = model(step_ids, attention_mask=step_mask, cache=dense)
        got = model(step_ids, attention_mask=step_mask, cache=paged)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        step_ids = expected[:, -1:].argmax(-1)
        step_mask = torch.cat((step_mask, torch.ones_like(step_ids)), 1)
    assert paged.length == dense.length == 34
    options = {"attention_mask": mask, "eos_token_id": 3}
    assert torch.equal(model.generate(ids, 12, page_size=5, **options), model.generate(ids, 12, **options))


def test_the_shipped_demo_model_decodes_the_same_tokens_over_pages(path):
    from sparsa.experiments.demo import SHIPPED
    from sparsa.models import Transformer
    from sparsa.tasks import EOS, make_task, sample

    model = Transformer.from_pretrained(SHIPPED / "copy" / "asentmax").eval()
    task = make_task("copy", vocab=1024, distinct=1)
    prompts = [torch.from_numpy(sample(task, 0, "test", n, 0).tokens[: n + 2]) for n in (96, 64)]
    ids = torch.zeros(2, 98, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, 98 - len(prompt) :], mask[row, 98 - len(prompt) :] = prompt, 1
    options = {"attention_mask": mask, "eos_token_id": EOS}
    paged = model.generate(ids, 20, page_size=16, **options)
    assert torch.equal(paged, model.generate(ids, 20, **options))
    assert torch.equal(paged[0, 98:], ids[0, 1:21])


def test_generate_refuses_a_bad_page_size():
    from sparsa.models import Transformer, TransformerConfig

    model = Transformer(TransformerConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="page_size"):
        model.generate(torch.ones(1, 3, dtype=torch.long), 2, page_size=0)


def test_the_decode_benchmark_measures_and_tabulates_a_small_case():
    from sparsa.benchmarks import decode as bench

    row = bench.measure_case("synthetic", 1, 512, "fp32", repeats=1, seed=0)
    assert row["max_abs_error"] < 1e-4
    assert all(0 < row[k] <= 1 for k in ("pages_read", "pages_read_alibi_heads", "pages_read_nope_heads"))
    assert row["paged_ms"] > 0 and row["paged_vs_dense"] == row["paged_ms"] / row["dense_ms"]
    model = bench.model_certificates(length=64, every=16)
    assert {(r["layer"], r["heads"]) for r in model} == {(1, "alibi"), (1, "nope"), (2, "alibi"), (2, "nope")}
    table = bench.markdown_table({"rows": [row]})
    assert table.splitlines()[2].startswith("| synthetic | 1 | 512 | fp32 |")
    assert "| 2 | nope | 131 | 5 |" in bench.model_table({"model": model})
