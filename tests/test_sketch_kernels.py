"""The sketches' exact integer products (int8 and 4-bit codes): every kernel exact, the calibration's choice
and its refusals."""

import importlib

import pytest
import torch

import sparsa
from sparsa.attention import PagedKVCache, decode, sketch_kernels
from sparsa.benchmarks import decode as bench

paged = importlib.import_module("sparsa.attention.paged")


@pytest.fixture(autouse=True)
def _fresh_calibration(monkeypatch):
    monkeypatch.setattr(sketch_kernels, "_calibrations", {})
    monkeypatch.delenv(sketch_kernels.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.delenv(sketch_kernels.NIBBLE_ENVIRONMENT_VARIABLE, raising=False)


def _page_max(codes, query_codes, page_size):
    return (query_codes.long() @ codes.long().T).view(len(query_codes), -1, page_size).amax(-1)


@pytest.mark.parametrize("name", sorted(sketch_kernels.KERNELS))
@pytest.mark.parametrize(("dim", "page_size"), [(3, 1), (5, 6), (16, 8), (128, 16), (512, 32)])
def test_every_kernel_gives_the_exact_page_maxima(name, dim, page_size):
    kernel = sketch_kernels.KERNELS[name]
    if not kernel.available(torch.device("cpu"), dim, page_size):
        pytest.skip(f"{name} does not run here for D={dim}, pages of {page_size}")
    (codes, query_codes), _ = sketch_kernels._extreme_cases(dim, coarse=False)
    keys = (sketch_kernels.FLOAT_KEYS // page_size + 3) * page_size
    random_codes = torch.randint(-127, 128, (keys, dim), dtype=torch.int8)
    arranged, _, expected = sketch_kernels._reference_case(codes, query_codes, page_size, coarse=False)
    random_queries = torch.randint(-32385, 32386, (5, dim), dtype=torch.int16)
    cases = [(arranged, query_codes, expected), (arranged, query_codes[2:3], expected[2:3])]
    cases.append((random_codes, random_queries, _page_max(random_codes, random_queries, page_size)))
    for keys, queries, expected in cases:
        assert torch.equal(kernel.page_max(keys, queries, page_size).long(), expected)


@pytest.mark.parametrize("name", sorted(sketch_kernels.NIBBLE_KERNELS))
@pytest.mark.parametrize(("dim", "page_size"), [(64, 8), (128, 16), (192, 8), (512, 32)])
def test_every_nibble_kernel_gives_the_exact_page_maxima(name, dim, page_size):
    kernel = sketch_kernels.NIBBLE_KERNELS[name]
    if not kernel.available(torch.device("cpu"), dim, page_size):
        pytest.skip(f"{name} does not run here for D={dim}, pages of {page_size}")
    (codes, query_codes), _ = sketch_kernels._extreme_cases(dim, coarse=True)
    packed, _, expected = sketch_kernels._reference_case(codes, query_codes, page_size, coarse=True)
    keys = (sketch_kernels.FLOAT_KEYS // page_size + 3) * page_size
    random_codes = torch.randint(-7, 8, (keys, dim), dtype=torch.int8)
    random_queries = torch.randint(-127, 128, (5, dim), dtype=torch.int8)
    cases = [(packed, query_codes, expected), (packed, query_codes[2:3], expected[2:3])]
    random_expected = _page_max(random_codes, random_queries, page_size)
    cases.append((sketch_kernels.pack_nibbles(random_codes), random_queries, random_expected))
    for keys, queries, expected in cases:
        assert torch.equal(kernel.page_max(keys, queries, page_size).long(), expected)


@pytest.mark.parametrize("dim", [1, 3, 64, 100, 130])
def test_nibbles_unpack_to_the_codes_they_packed(dim):
    codes = torch.randint(-7, 8, (5, 3, dim), dtype=torch.int8)
    packed = sketch_kernels.pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, sketch_kernels.nibble_dim(dim) // 2)
    unpacked = sketch_kernels.unpack_nibbles(packed)
    assert torch.equal(unpacked[..., :dim], codes) and not bool(unpacked[..., dim:].any())


def test_the_coarse_extreme_cases_reach_the_largest_sums():
    (codes, query_codes), _ = sketch_kernels._extreme_cases(128, coarse=True)
    sums = query_codes.long() @ codes.long().T
    largest = 7 * 127 * 128
    assert int(sums.max()) == largest and int(sums.min()) == -largest and bool((sums == 0).any())


def test_the_extreme_cases_reach_the_largest_sums():
    (codes, query_codes), _ = sketch_kernels._extreme_cases(128, coarse=False)
    sums = query_codes.long() @ codes.long().T
    largest = 127 * sketch_kernels.QUERY_LEVELS * 128
    assert int(sums.max()) == largest and int(sums.min()) == -largest
    assert bool((sums == 0).any())
    parts = sketch_kernels._parts(query_codes)
    assert int(parts.abs().max()) == 127
    high, low = parts[: len(query_codes)].long(), parts[len(query_codes) :].long()
    assert torch.equal(255 * high + low, query_codes.long())


def test_calibration_picks_an_exact_kernel_and_times_each():
    found = sketch_kernels.calibration("cpu", 128)
    assert found.kernel in sketch_kernels.KERNELS and found.kernel in found.milliseconds
    assert found.milliseconds[found.kernel] == min(found.milliseconds.values())
    assert sketch_kernels.calibration(torch.device("cpu"), 128) is found


def _register(monkeypatch, name, page_max):
    broken = sketch_kernels.Kernel(name, page_max, lambda device, dim, page_size: True)
    monkeypatch.setitem(sketch_kernels.KERNELS, name, broken)


def test_calibration_rejects_a_kernel_that_saturates(monkeypatch):
    def saturating(codes, query_codes, page_size):
        return _page_max(codes, query_codes, page_size).clamp(-(2**15), 2**15 - 1).int()

    _register(monkeypatch, "saturating", saturating)
    found = sketch_kernels.calibration("cpu", 128)
    assert found.rejected == ("saturating",) and "saturating" not in found.milliseconds
    monkeypatch.setenv(sketch_kernels.ENVIRONMENT_VARIABLE, "saturating")
    with pytest.raises(RuntimeError, match="no exact sketch product"):
        sketch_kernels.calibration("cpu", 128)


def test_the_coarse_calibration_rejects_int16_sums(monkeypatch):
    """vpmaddubsw's int16 sums are exact over 256 dimensions, not over 512: a kernel that kept them
    longer would wrap, and the extremes show it."""

    def wrapping(packed, query_codes, page_size):
        codes = sketch_kernels.unpack_nibbles(packed)
        dots = (query_codes.long() @ (codes.long() + 8).T).view(len(query_codes), -1, page_size)
        wrapped = (dots + 2**15) % 2**16 - 2**15 - 8 * query_codes.long().sum(-1)[:, None, None]
        return wrapped.amax(-1).int()

    monkeypatch.setitem(
        sketch_kernels.NIBBLE_KERNELS,
        "wrapping",
        sketch_kernels.Kernel("wrapping", wrapping, lambda *_: True),
    )
    found = sketch_kernels.calibration("cpu", 512, coarse=True)
    assert found.rejected == ("wrapping",) and found.kernel in sketch_kernels.NIBBLE_KERNELS


def test_calibration_rejects_an_error_hidden_behind_a_larger_key(monkeypatch):
    """A kernel wrong on every second key of a page is right wherever an even key is its page's largest."""

    def even_keys_only(codes, query_codes, page_size):
        dots = (query_codes.long() @ codes.long().T).view(len(query_codes), -1, page_size)
        return dots[:, :, ::2].amax(-1).int()

    _register(monkeypatch, "even_keys_only", even_keys_only)
    assert "even_keys_only" in sketch_kernels.calibration("cpu", 128, page_size=16).rejected


def test_the_environment_variable_forces_a_kernel_and_names_itself_when_wrong(monkeypatch):
    for name in sketch_kernels.KERNELS:
        if not sketch_kernels.KERNELS[name].available(torch.device("cpu"), 64, 16):
            continue
        monkeypatch.setenv(sketch_kernels.ENVIRONMENT_VARIABLE, name)
        assert sketch_kernels.calibration("cpu", 64).kernel == name
    monkeypatch.setenv(sketch_kernels.ENVIRONMENT_VARIABLE, "fastest")
    with pytest.raises(ValueError, match="SPARSA_SKETCH_KERNEL must be one of"):
        sketch_kernels.calibration("cpu", 64)
    monkeypatch.delenv(sketch_kernels.ENVIRONMENT_VARIABLE)
    for name in sketch_kernels.NIBBLE_KERNELS:
        if sketch_kernels.NIBBLE_KERNELS[name].available(torch.device("cpu"), 64, 16):
            monkeypatch.setenv(sketch_kernels.NIBBLE_ENVIRONMENT_VARIABLE, name)
            assert sketch_kernels.calibration("cpu", 64, coarse=True).kernel == name
    monkeypatch.setenv(sketch_kernels.NIBBLE_ENVIRONMENT_VARIABLE, "int_mm")
    with pytest.raises(ValueError, match="SPARSA_NIBBLE_KERNEL must be one of"):
        sketch_kernels.calibration("cpu", 64, coarse=True)


def test_the_compiled_kernel_is_left_out_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert not sketch_kernels.KERNELS["compiled"].available(torch.device("cpu"), 128, 16)
    assert "compiled" not in sketch_kernels.calibration("cpu", 128).milliseconds
    monkeypatch.setenv(sketch_kernels.ENVIRONMENT_VARIABLE, "compiled")
    with pytest.raises(ValueError, match="compiled is not available on cpu for D=128"):
        sketch_kernels.calibration("cpu", 128)


def test_a_failed_build_leaves_the_pytorch_kernels(monkeypatch, capsys):
    from torch.utils import cpp_extension

    def no_compiler(**options):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(sketch_kernels.SKETCH_LIBRARY, "_built", None)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    found = sketch_kernels.calibration("cpu", 128)
    assert "compiled" not in found.milliseconds and found.kernel in found.milliseconds
    assert "did not build (Ninja is required" in capsys.readouterr().err


def test_head_dims_beyond_exact_int32_sums_are_refused_and_decode_without_a_sketch():
    with pytest.raises(ValueError, match="head_dim <= 512"):
        sketch_kernels.page_max_dots(
            torch.zeros(16, 513, dtype=torch.int8), torch.zeros(2, 513, dtype=torch.int16), 16
        )
    q, k, v = torch.randn(1, 2, 1, 520), torch.randn(1, 2, 256, 520), torch.randn(1, 2, 256, 520)
    k[:, :, 17] = 4 * q[0, :, 0]
    cache = PagedKVCache(1, 2, 520, page_size=16)
    cache.append(k, v)
    out, stats = decode(q, cache, alpha=1.5, dense_below=0, return_stats=True)
    assert not bool(stats.sketched.any()) and not bool(stats.coarse_sketched.any())
    torch.testing.assert_close(out, sparsa.attention(q, k, v, alpha=1.5, is_causal=True), atol=1e-5, rtol=0)


def _structured_cache(length=2048):
    q, k, v, _ = bench.make_inputs("structured", 1, length, torch.float32, seed=3)
    cache = PagedKVCache(1, k.shape[1], k.shape[3], page_size=16)
    cache.append(k, v)
    return q, k, v, cache


@pytest.mark.parametrize("coarse", [True, False])
def test_every_kernel_decodes_the_structured_cache_exactly(monkeypatch, coarse):
    """Only the sketches rule pages out on this cache; with any kernel the result is the dense one. The
    4-bit sketch alone certifies it; with that stage off, the int8 sketch does."""
    q, k, v, cache = _structured_cache()
    expected, expected_stats = sparsa.attention(
        q.double(), k.double(), v.double(), alpha=1.5, is_causal=True, backend="reference", return_stats=True
    )
    if not coarse:
        monkeypatch.setattr(paged._Rows, "_content_heads", lambda rows: torch.zeros(1, 8, dtype=torch.bool))
    kernels, variable = (
        (sketch_kernels.NIBBLE_KERNELS, sketch_kernels.NIBBLE_ENVIRONMENT_VARIABLE)
        if coarse
        else (sketch_kernels.KERNELS, sketch_kernels.ENVIRONMENT_VARIABLE)
    )
    outputs = {}
    for name in kernels:
        monkeypatch.setenv(variable, name)
        out, stats = decode(q, cache, alpha=1.5, dense_below=0, return_stats=True)
        if coarse:
            assert stats.coarse_sketch_kernel == name and bool(stats.coarse_sketched.all())
            assert not bool(stats.sketched.any())
        else:
            assert stats.sketch_kernel == name and bool(stats.sketched.all())
            assert not bool(stats.coarse_sketched.any())
        assert float(stats.pages_read.float().mean()) < 0.05 * float(stats.pages_visible.float().mean())
        # fp32 rounding of scores near 35 (keys of norm about 35): within 1e-4 of fp64, same support.
        torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=0)
        assert torch.equal(stats.support, expected_stats.support)
        outputs[name] = out
    first, *others = outputs.values()
    for out in others:
        torch.testing.assert_close(out, first, atol=1e-6, rtol=0)


def test_the_min_max_bounds_rule_out_nothing_on_the_structured_cache():
    """Why content heads are sketched first: their page minima and maxima bound almost no page below the
    row's own threshold, while the sketch leaves open only the pages that hold support."""
    q, k, v, cache = _structured_cache()
    _, exact = sparsa.attention(q, k, v, alpha=1.5, is_causal=True, return_stats=True)
    pages = cache.pages(0)
    high, low = cache.key_extremes[0, :, :pages].unbind(2)
    group = q.shape[1] // k.shape[1]
    query = q[0, :, 0].view(k.shape[1], group, -1)
    bound = query.clamp_min(0) @ high.transpose(-1, -2) + query.clamp_max(0) @ low.transpose(-1, -2)
    bound = bound.flatten(0, 1) / k.shape[-1] ** 0.5
    ruled_out = (0.5 * bound <= exact.tau[0, :, :1]).float().mean()
    assert float(ruled_out) < 0.1
    _, stats = decode(q, cache, alpha=1.5, dense_below=0, return_stats=True)
    assert bool(stats.coarse_sketched.all())
    assert float(stats.candidate_pages.float().mean()) < 0.05 * pages


def test_softmax_rows_decode_densely_without_a_sketch():
    q, _, _, cache = _structured_cache(length=512)
    _, stats = decode(q, cache, alpha=1.0, dense_below=0, return_stats=True)
    assert bool(stats.dense.all()) and stats.sketch_kernel is None
