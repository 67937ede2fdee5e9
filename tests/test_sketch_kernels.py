"""The sketch's exact int8 products: every kernel exact, the calibration's choice and its refusals."""

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


@pytest.mark.parametrize("name", sorted(sketch_kernels.KERNELS))
@pytest.mark.parametrize("dim", [3, 16, 128, 1040])
def test_every_kernel_gives_the_exact_integers(name, dim):
    codes, query_codes = sketch_kernels._extreme_codes(torch.device("cpu"), dim)
    random_codes = torch.randint(-127, 128, (sketch_kernels.FLOAT_CHUNK + 5, dim), dtype=torch.int8)
    for keys in (codes, random_codes):
        got = sketch_kernels.KERNELS[name].product(keys, query_codes)
        assert torch.equal(got.long(), query_codes.long() @ keys.long().T)


def test_the_extreme_codes_reach_the_largest_sums():
    codes, query_codes = sketch_kernels._extreme_codes(torch.device("cpu"), 128)
    sums = codes.long() @ query_codes.long().T
    assert int(sums.max()) == 127 * 127 * 128 and int(sums.min()) == -127 * 127 * 128
    assert bool((sums == 0).any())


def test_calibration_picks_an_exact_kernel_and_times_each():
    found = sketch_kernels.calibration("cpu", 128)
    assert found.kernel in sketch_kernels.KERNELS and found.kernel in found.milliseconds
    assert found.milliseconds[found.kernel] == min(found.milliseconds.values())
    assert sketch_kernels.calibration(torch.device("cpu"), 128) is found


def test_calibration_rejects_a_kernel_that_saturates(monkeypatch):
    def saturating(codes, query_codes):
        return (query_codes.float() @ codes.float().T).clamp(-(2**15), 2**15 - 1)

    broken = sketch_kernels.Kernel("saturating", saturating, lambda device, dim: True)
    monkeypatch.setitem(sketch_kernels.KERNELS, "saturating", broken)
    found = sketch_kernels.calibration("cpu", 128)
    assert found.rejected == ("saturating",) and "saturating" not in found.milliseconds
    monkeypatch.setenv(sketch_kernels.ENVIRONMENT_VARIABLE, "saturating")
    with pytest.raises(RuntimeError, match="no exact int8 product"):
        sketch_kernels.calibration("cpu", 128)


def test_the_environment_variable_forces_a_kernel_and_names_itself_when_wrong(monkeypatch):
    for name in sketch_kernels.KERNELS:
        monkeypatch.setenv(sketch_kernels.ENVIRONMENT_VARIABLE, name)
        assert sketch_kernels.calibration("cpu", 64).kernel == name
    monkeypatch.setenv(sketch_kernels.ENVIRONMENT_VARIABLE, "fastest")
    with pytest.raises(ValueError, match="SPARSA_SKETCH_KERNEL must be one of"):
        sketch_kernels.calibration("cpu", 64)


def test_head_dims_beyond_exact_fp32_sums_are_refused():
    with pytest.raises(ValueError, match="head_dim <= 1040"):
        sketch_kernels.integer_dots(
            torch.zeros(4, 1041, dtype=torch.int8), torch.zeros(2, 1041, dtype=torch.int8)
        )


def _structured_cache(length=2048):
    q, k, v, _ = bench.make_inputs("structured", 1, length, torch.float32, seed=3)
    cache = PagedKVCache(1, k.shape[1], k.shape[3], page_size=16)
    cache.append(k, v)
    return q, k, v, cache


def test_every_kernel_decodes_the_structured_cache_exactly(monkeypatch):
    """Only the sketch rules pages out on this cache; with either kernel the result is the dense one."""
    q, k, v, cache = _structured_cache()
    expected, expected_stats = sparsa.attention(
        q.double(), k.double(), v.double(), alpha=1.5, is_causal=True, backend="reference", return_stats=True
    )
    outputs = {}
    for name in sketch_kernels.KERNELS:
        monkeypatch.setenv(sketch_kernels.ENVIRONMENT_VARIABLE, name)
        out, stats = decode(q, cache, alpha=1.5, dense_below=0, return_stats=True)
        assert stats.sketch_kernel == name and bool(stats.sketched.all())
        assert float(stats.pages_read.float().mean()) < 0.05 * float(stats.pages_visible.float().mean())
        # fp32 rounding of scores near 35 (keys of norm about 35): within 1e-4 of fp64, same support.
        torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=0)
        assert torch.equal(stats.support, expected_stats.support)
        outputs[name] = out
    first, *others = outputs.values()
    for out in others:
        torch.testing.assert_close(out, first, atol=1e-6, rtol=0)


def test_the_min_max_bounds_rule_out_nothing_on_the_structured_cache(monkeypatch):
    monkeypatch.setattr(paged, "SKETCH_OPEN_SHARE", float("inf"))
    q, _, _, cache = _structured_cache()
    _, stats = decode(q, cache, alpha=1.5, dense_below=0, return_stats=True)
    assert not bool(stats.sketched.any())
    assert float(stats.candidate_pages.float().mean()) > 0.9 * float(stats.pages_visible.float().mean())


def test_softmax_rows_decode_densely_without_a_sketch():
    q, _, _, cache = _structured_cache(length=512)
    _, stats = decode(q, cache, alpha=1.0, dense_below=0, return_stats=True)
    assert bool(stats.dense.all()) and stats.sketch_kernel is None
