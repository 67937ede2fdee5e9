"""Long rows: the candidate-block solver and the compiled kernels must give the dense answer."""

import math

import pytest
import torch

import sparsa
from oracles import bisection_entmax
from sparsa.normalize import _candidates

ALPHAS = [1.25, 1.5, 1.75, 2.0]


def attention_like(rows, length, dtype=torch.float64):
    """Gaussian scores with a few strong keys per row, like trained attention."""
    x = torch.randn(rows, length, dtype=dtype)
    hot = torch.randint(0, length, (rows, 4))
    return x.scatter_add(1, hot, torch.full((rows, 4), 12.0, dtype=dtype))


@pytest.fixture
def dense_only(monkeypatch):
    monkeypatch.setattr(_candidates, "MIN_BLOCKS", 1 << 30)


def narrowed_widths(monkeypatch):
    widths = []
    original = _candidates.Entries.narrow

    def spy(self, lower_bound):
        original(self, lower_bound)
        if self.order is not None:
            widths.append(self.values.shape[-1])

    monkeypatch.setattr(_candidates.Entries, "narrow", spy)
    return widths


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("length", [1000, 4099])
def test_candidate_blocks_give_the_dense_answer(alpha, length, monkeypatch):
    x = attention_like(8, length)
    x[1, :500] = -math.inf
    x[2, -3:] = 15.0  # strong keys in the tail past the last whole block
    widths = narrowed_widths(monkeypatch)
    p = sparsa.entmax(x, alpha)
    assert widths and max(widths) < length / 4, "the candidate path was not exercised"
    torch.testing.assert_close(p, bisection_entmax(x, alpha), atol=1e-10, rtol=0)
    monkeypatch.setattr(_candidates, "MIN_BLOCKS", 1 << 30)
    torch.testing.assert_close(p, sparsa.entmax(x, alpha), atol=1e-12, rtol=0)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_candidate_blocks_with_partial_sort_and_threshold(alpha, monkeypatch):
    x = attention_like(5, 2048)
    widths = narrowed_widths(monkeypatch)
    tau = sparsa.entmax_threshold(x, alpha, k=3)
    assert widths
    p = ((alpha - 1) * x - tau).clamp_min(0).pow(1 / (alpha - 1))
    torch.testing.assert_close(p, bisection_entmax(x, alpha), atol=1e-10, rtol=0)
    torch.testing.assert_close(sparsa.entmax(x, alpha, k=3), p, atol=1e-12, rtol=0)


def test_candidate_blocks_with_per_row_alpha_gradients_and_bad_rows(monkeypatch):
    x = attention_like(4, 1024).requires_grad_()
    alpha = torch.tensor([[1.0], [1.3], [1.5], [1.9]], dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4, 1024, dtype=torch.float64)
    (sparsa.entmax(x, alpha) * upstream).sum().backward()
    grads = x.grad.clone(), alpha.grad.clone()
    x.grad = alpha.grad = None
    monkeypatch.setattr(_candidates, "MIN_BLOCKS", 1 << 30)
    (sparsa.entmax(x, alpha) * upstream).sum().backward()
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], alpha.grad)
    bad = attention_like(3, 1024)
    bad[0, 7] = math.nan
    bad[1] = -math.inf
    p = sparsa.entmax(bad, 1.5)
    assert torch.isnan(p[0]).all() and (p[1] == 0).all()
    torch.testing.assert_close(p[2], sparsa.entmax(bad[2], 1.5))


@pytest.mark.parametrize("alpha", [1.0, 1.25, 1.5, 2.0])
def test_compiled_kernels_match_eager(alpha):
    x = attention_like(64, 700, dtype=torch.float32).requires_grad_()
    upstream = torch.randn(64, 700)
    with sparsa.normalize.compile_mode("always"):
        p = sparsa.entmax(x, alpha)
        (p * upstream).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    eager = sparsa.entmax(x, alpha)
    (eager * upstream).sum().backward()
    torch.testing.assert_close(p, eager, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, x.grad, atol=1e-5, rtol=1e-5)


def test_compiled_kernels_handle_changing_shapes():
    with sparsa.normalize.compile_mode("always"):
        for length in (300, 301, 517):
            x = attention_like(3, length, dtype=torch.float32)
            torch.testing.assert_close(
                sparsa.entmax15(x).double(), bisection_entmax(x, 1.5), atol=1e-6, rtol=0
            )


def test_compile_mode_is_validated():
    with pytest.raises(ValueError, match="compile mode"):
        sparsa.normalize.set_compile_mode("sometimes")
