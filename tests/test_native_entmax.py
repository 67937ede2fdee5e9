"""The compiled row solver of 1.5-entmax and sparsemax (normalize/csrc/entmax_rows.cpp): the PyTorch
solver's weights, maxima and thresholds on every kind of row, its sorted fallback, and where it is used."""

import math

import pytest
import torch

import sparsa
from oracles import bisection_entmax, brute_force_row
from sparsa.normalize import _native, maps

pytestmark = pytest.mark.skipif(not _native.ENTMAX_ROWS.built(), reason="no C++ row solver here")

LENGTHS = [1, 2, 7, 16, 33, 700, 4099]


def rows_of_every_kind(length, dtype):
    """Attention-like, wide Gaussian (many candidates), constant (all tied), one-hot, ties at the
    threshold, causal (-inf tail), all -inf, NaN, +inf, huge scores, huge offsets, tiny spreads."""
    rows = [torch.randn(length, dtype=dtype) + 12 * (torch.rand(length) < 4 / length)]
    rows.append(4 * torch.randn(length, dtype=dtype))
    rows.append(torch.full((length,), 3.0, dtype=dtype))
    rows.append(torch.nn.functional.one_hot(torch.tensor(length // 2), length).to(dtype) * 5)
    tied = torch.zeros(length, dtype=dtype)
    tied[: (length + 1) // 2] = 1.0
    rows.append(tied)
    causal = torch.randn(length, dtype=dtype)
    causal[length // 3 + 1 :] = -math.inf
    rows.append(causal)
    rows.append(torch.full((length,), -math.inf, dtype=dtype))
    for bad in (math.nan, math.inf):
        row = torch.randn(length, dtype=dtype)
        row[length // 2] = bad
        rows.append(row)
    rows.append(1e30 * torch.randn(length, dtype=dtype))
    rows.append(1e4 + 0.5 * torch.randn(length, dtype=dtype))
    rows.append(1 + 1e-6 * torch.randn(length, dtype=dtype))
    return torch.stack(rows)


def pytorch_solver(x, alpha):
    return maps.entmax_rows(x, alpha, compiled=False)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("newton_steps", [0, 24])
def test_native_solver_gives_the_pytorch_solvers_answer(alpha, dtype, length, newton_steps):
    x = rows_of_every_kind(length, dtype)
    weights, m, s = _native.native_entmax_rows(x, alpha, newton_steps)
    expected_weights, expected_m, expected_s = pytorch_solver(x, alpha)
    # Both solvers sum up to 4099 terms in different orders.
    close = {"atol": 16 * torch.finfo(dtype).eps, "rtol": 1e-5 if dtype == torch.float32 else 1e-11}
    torch.testing.assert_close(m, expected_m, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(s, expected_s, equal_nan=True, **close)
    torch.testing.assert_close(weights, expected_weights, equal_nan=True, **close)
    valid, invalid = torch.isfinite(s).squeeze(-1), torch.isnan(s).squeeze(-1)
    torch.testing.assert_close(weights[valid].sum(-1), torch.ones(int(valid.sum()), dtype=dtype))
    assert int(invalid.sum()) == 2 and torch.isnan(weights[invalid]).all()
    assert (weights[~valid & ~invalid] == 0).all() and int((~valid & ~invalid).sum()) == 1


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_native_solver_matches_brute_force_and_bisection(alpha):
    short = torch.randn(40, 7, dtype=torch.float64) * 2
    weights, _, _ = _native.native_entmax_rows(short, alpha)
    expected = torch.tensor([brute_force_row(row, alpha) for row in short.tolist()], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-12)
    long = torch.randn(16, 3000, dtype=torch.float64) * 3
    torch.testing.assert_close(
        _native.native_entmax_rows(long, alpha)[0], bisection_entmax(long, alpha), rtol=0, atol=1e-10
    )


def test_native_solver_is_the_same_on_any_number_of_threads():
    x = 3 * torch.randn(257, 1000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = _native.native_entmax_rows(x, 1.5)
    finally:
        torch.set_num_threads(threads)
    for single, shared in zip(alone, _native.native_entmax_rows(x, 1.5), strict=True):
        assert torch.equal(single, shared)


def test_native_solver_takes_strided_rows_and_refuses_what_it_cannot_solve():
    x = torch.randn(300, 50)
    weights, _, _ = _native.native_entmax_rows(x.T, 2.0)
    torch.testing.assert_close(weights, pytorch_solver(x.T.contiguous(), 2.0)[0], rtol=0, atol=1e-6)
    assert _native.native_entmax_rows(x.half(), 1.5) is None
    assert _native.native_entmax_rows(x[:, :0], 1.5) is None
    with pytest.raises(RuntimeError, match=r"alpha must be 1\.5 or 2"):
        torch.ops.sparsa_entmax.entmax_rows(x, 1.25, 24)


def test_compiled_mode_uses_the_native_solver_for_1_5_and_sparsemax_only(monkeypatch):
    calls = []

    def spy(x, alpha, *args):
        calls.append(alpha)
        return _native.native_entmax_rows(x, alpha, *args)

    monkeypatch.setattr(maps, "native_entmax_rows", spy)
    x = 2 * torch.randn(6, 300, dtype=torch.float64)
    with sparsa.normalize.compile_mode("always"):
        for alpha in (1.5, 2.0, 1.25, 1.0):
            torch.testing.assert_close(
                sparsa.entmax(x, alpha), maps.entmax_rows(x, alpha, compiled=False)[0], rtol=0, atol=1e-12
            )
        sparsa.entmax(x, torch.full((6, 1), 1.5, dtype=torch.float64))
    assert calls == [1.5, 2.0]
    sparsa.entmax(x, 1.5)
    assert calls == [1.5, 2.0], "the eager mode runs PyTorch's solver"


def test_blocked_attention_with_the_native_solver_matches_the_reference():
    q, k, v = (torch.randn(2, 4, 300, 16, dtype=torch.float64) for _ in range(3))
    q.requires_grad_()
    slopes = torch.tensor([0.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    options = {"alpha": 1.5, "is_causal": True, "alibi_slopes": slopes}
    with sparsa.normalize.compile_mode("always"):
        out = sparsa.attention(q, k, v, backend="blocked", **options)
        (grad,) = torch.autograd.grad(out.square().sum(), q)
    expected = sparsa.attention(q, k, v, backend="reference", **options)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), q)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-9)


def test_a_failed_build_or_a_cpu_without_avx2_leaves_the_pytorch_solver(monkeypatch, capsys):
    from torch.utils import cpp_extension

    def no_compiler(**options):
        raise RuntimeError("Ninja is required to load C++ extensions")

    x = 2 * torch.randn(6, 300)
    expected = maps.entmax_rows(x, 1.5, compiled=False)[0]
    monkeypatch.setattr(_native.ENTMAX_ROWS, "_built", None)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    assert _native.native_entmax_rows(x, 1.5) is None
    assert "did not build (Ninja is required" in capsys.readouterr().err
    with sparsa.normalize.compile_mode("always"):
        torch.testing.assert_close(sparsa.entmax(x, 1.5), expected, rtol=0, atol=1e-6)
    monkeypatch.setattr(_native.ENTMAX_ROWS, "_built", True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert _native.native_entmax_rows(x, 1.5) is None
