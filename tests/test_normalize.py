import math

import entmax as entmax_package
import pytest
import torch

import sparsa
from oracles import bisection_entmax, brute_force_row
from sparsa.normalize import Entmax, Entmax15, Softmax, Sparsemax, get_normalizer

ALPHAS = [1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0]


def scores(*shape, std=2.0, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype) * std


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
def test_entmax_matches_bisection(alpha, dtype, atol):
    x = scores(64, 50, dtype=dtype)
    p = sparsa.entmax(x, alpha)
    assert p.dtype == dtype
    if alpha > 2 and dtype == torch.float32:
        atol = 1e-5  # weights grow like sqrt(distance to tau) at alpha 3: ill-conditioned at the edge
    torch.testing.assert_close(p.double(), bisection_entmax(x, alpha), atol=atol, rtol=0)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_exact_maps_match_brute_force_over_supports(alpha):
    x = scores(40, 6)
    expected = torch.tensor([brute_force_row(row, alpha) for row in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(sparsa.entmax(x, alpha), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(sparsa.entmax(x, alpha, k=2), expected, atol=1e-12, rtol=0)


def test_exact_maps_match_the_entmax_package():
    x = scores(100, 77, std=3.0)
    torch.testing.assert_close(sparsa.entmax15(x), entmax_package.entmax15(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(sparsa.sparsemax(x), entmax_package.sparsemax(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("fn", [sparsa.entmax15, sparsa.sparsemax])
@pytest.mark.parametrize("k", [1, 2, 3, 10, 1000])
def test_partial_sort_falls_back_when_support_reaches_k(fn, k):
    x = scores(30, 40, std=0.3)  # small spread: supports of 10+ entries
    assert int(sparsa.support_size(x, 1.5).max()) > 3
    torch.testing.assert_close(fn(x, k=k), fn(x), atol=1e-12, rtol=0)


def test_exact_solver_falls_back_to_sort_for_ties():
    x = torch.tensor([[1.0, 1.0, 1.0, -5.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    for alpha in (1.5, 2.0):
        expected = torch.tensor([brute_force_row(row, alpha) for row in x.tolist()], dtype=torch.float64)
        torch.testing.assert_close(sparsa.entmax(x, alpha), expected, atol=1e-12, rtol=0)


def test_alpha_one_is_softmax():
    x = scores(8, 9)
    torch.testing.assert_close(sparsa.entmax(x, 1.0), torch.softmax(x, -1))
    torch.testing.assert_close(sparsa.softmax(x, 0), torch.softmax(x, 0))
    per_row = torch.ones(8, 1, dtype=torch.float64)
    torch.testing.assert_close(sparsa.entmax(x, per_row), torch.softmax(x, -1))


def test_per_row_alpha_equals_row_by_row():
    x = scores(4, 3, 20)
    alpha = torch.tensor([1.0, 1.3, 1.5, 2.0], dtype=torch.float64).view(4, 1, 1)
    p = sparsa.entmax(x, alpha)
    for i in range(4):
        torch.testing.assert_close(p[i], sparsa.entmax(x[i], float(alpha[i])), atol=1e-10, rtol=0)


def test_per_head_alpha_broadcasts_over_batch_and_queries():
    x = scores(2, 3, 5, 7)
    alpha = torch.tensor([1.2, 1.5, 1.8], dtype=torch.float64).view(3, 1, 1)
    p = sparsa.entmax(x, alpha)
    for h in range(3):
        torch.testing.assert_close(p[:, h], bisection_entmax(x[:, h], float(alpha[h])), atol=1e-10, rtol=0)


@pytest.mark.parametrize("alpha", [1.0, 1.25, 1.5, 2.0])
def test_any_dim_and_non_contiguous_input(alpha):
    x = scores(6, 7, 8)
    for dim in range(3):
        moved = x.movedim(dim, -1)
        expected = sparsa.entmax(moved.contiguous(), alpha).movedim(-1, dim)
        torch.testing.assert_close(sparsa.entmax(x, alpha, dim=dim), expected)
    strided = scores(10, 40)[:, ::2]
    torch.testing.assert_close(sparsa.entmax(strided, alpha), sparsa.entmax(strided.contiguous(), alpha))


@pytest.mark.parametrize("alpha", [1.0, 1.5, 1.3, 2.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_fp32(alpha, dtype):
    x = scores(16, 33, dtype=torch.float32).to(dtype)
    x.requires_grad_()
    p = sparsa.entmax(x, alpha)
    assert p.dtype == dtype
    torch.testing.assert_close(p.float(), sparsa.entmax(x.detach().float(), alpha), atol=4e-3, rtol=1e-2)
    p.backward(torch.randn_like(p))
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("alpha", [1.0, 1.3, 1.5, 2.0])
def test_masked_entries_get_zero_and_fully_masked_rows_give_zeros(alpha):
    x = scores(3, 6)
    x[0, :2] = -math.inf
    x[1] = -math.inf
    x.requires_grad_()
    p = sparsa.entmax(x, alpha)
    assert (p[0, :2] == 0).all() and (p[1] == 0).all()
    torch.testing.assert_close(p[0, 2:], sparsa.entmax(x.detach()[0, 2:], alpha))
    torch.testing.assert_close(p[2], sparsa.entmax(x.detach()[2], alpha))
    p.backward(torch.randn_like(p))
    assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all()


@pytest.mark.parametrize("alpha", [1.0, 1.3, 1.5, 2.0])
def test_nan_or_inf_input_makes_that_row_nan(alpha):
    x = scores(3, 5)
    x[0, 1] = math.nan
    x[1, 2] = math.inf
    p = sparsa.entmax(x, alpha)
    assert torch.isnan(p[0]).any() and torch.isnan(p[1]).any()
    torch.testing.assert_close(p[2], sparsa.entmax(x[2], alpha))


@pytest.mark.parametrize("alpha", [1.0, 1.25, 1.5, 2.0])
def test_length_one_and_extreme_magnitudes(alpha):
    one = scores(5, 1)
    torch.testing.assert_close(sparsa.entmax(one, alpha), torch.ones_like(one))
    tiny = scores(4, 50) * 1e-6
    p = sparsa.entmax(tiny, alpha)
    assert (p > 0).all()
    torch.testing.assert_close(p, torch.full_like(tiny, 1 / 50), atol=1e-5, rtol=0)
    huge = scores(4, 50, dtype=torch.float32) * 1e4
    p = sparsa.entmax(huge, alpha)
    torch.testing.assert_close(p, torch.nn.functional.one_hot(huge.argmax(-1), 50).float())


@pytest.mark.parametrize("alpha", [1.0, 1.25, 1.5, 2.0])
def test_huge_rows(alpha):
    x = scores(2, 100_000, dtype=torch.float32)
    p = sparsa.entmax(x, alpha)
    torch.testing.assert_close(p.sum(-1), torch.ones(2), atol=1e-5, rtol=0)
    if alpha != 1.0:
        torch.testing.assert_close(p.double(), bisection_entmax(x, alpha), atol=1e-6, rtol=0)


def test_empty_input():
    assert sparsa.entmax(torch.empty(0, 5)).shape == (0, 5)
    assert sparsa.entmax(torch.empty(3, 0)).shape == (3, 0)


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0, 2.5])
def test_threshold_reconstructs_the_map_and_lies_in_its_bracket(alpha):
    x = scores(20, 30)
    tau = sparsa.entmax_threshold(x, alpha)
    assert tau.shape == (20, 1)
    p = ((alpha - 1) * x - tau).clamp_min(0).pow(1 / (alpha - 1))
    torch.testing.assert_close(p, sparsa.entmax(x, alpha), atol=1e-9, rtol=0)
    m = (alpha - 1) * x.amax(-1, keepdim=True)
    assert (m - 1 <= tau + 1e-12).all() and (tau <= m - 30 ** (1 - alpha) + 1e-12).all()
    assert (sparsa.support_size(x, alpha) == (p > 0).sum(-1)).all()


def test_threshold_of_masked_rows_and_k():
    x = scores(3, 8)
    x[1] = -math.inf
    tau = sparsa.entmax_threshold(x, 1.5, dim=-1)
    assert tau[1].item() == math.inf
    torch.testing.assert_close(sparsa.entmax_threshold(x, 1.5, k=2), tau)


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda x: sparsa.entmax(x, 0.5), ValueError),
        (lambda x: sparsa.entmax(x, math.nan), ValueError),
        (lambda x: sparsa.entmax(x, math.inf), ValueError),
        (lambda x: sparsa.entmax(x, torch.tensor([[0.9], [1.5]])), ValueError),
        (lambda x: sparsa.entmax(x, torch.full((2, 3), 1.5)), ValueError),
        (lambda x: sparsa.entmax(x, torch.full((5, 1), 1.5)), ValueError),
        (lambda x: sparsa.entmax(x, "1.5"), TypeError),
        (lambda x: sparsa.entmax(x, 1.5, dim=2), ValueError),
        (lambda x: sparsa.entmax(x, 1.5, k=0), ValueError),
        (lambda x: sparsa.entmax(x, 1.25, k=4), ValueError),
        (lambda x: sparsa.entmax(x, 1.25, tol=2.0), ValueError),
        (lambda x: sparsa.entmax(x.long(), 1.5), TypeError),
        (lambda x: sparsa.entmax([1.0, 2.0], 1.5), TypeError),
        (lambda x: sparsa.entmax(torch.tensor(1.0), 1.5), ValueError),
        (lambda x: sparsa.entmax_threshold(x, 1.0), ValueError),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, error):
    with pytest.raises(error):
        call(torch.randn(2, 3))


def test_error_messages_name_the_argument():
    with pytest.raises(ValueError, match="alpha"):
        sparsa.entmax(torch.randn(2, 3), 0.9)
    with pytest.raises(ValueError, match="dim"):
        sparsa.sparsemax(torch.randn(2, 3), dim=5)


def test_modules_and_registry():
    x = scores(4, 9)
    torch.testing.assert_close(Softmax(dim=0)(x), sparsa.softmax(x, 0))
    torch.testing.assert_close(Entmax15()(x), sparsa.entmax15(x))
    torch.testing.assert_close(Sparsemax()(x), sparsa.sparsemax(x))
    alpha = torch.nn.Parameter(torch.full((4, 1), 1.3, dtype=torch.float64))
    module = Entmax(alpha)
    assert any(p is alpha for p in module.parameters())
    module(x).sum().backward()
    assert alpha.grad is not None
    assert get_normalizer("entmax15").alpha == 1.5
    torch.testing.assert_close(get_normalizer("entmax-1.25")(x), sparsa.entmax(x, 1.25))
    with pytest.raises(ValueError, match="unknown normalizer"):
        get_normalizer("entmax-0.5")
