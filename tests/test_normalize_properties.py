"""Property tests: invariants every member of the entmax family must satisfy."""

import itertools
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import sparsa

finite = st.floats(min_value=-30, max_value=30, allow_nan=False, allow_infinity=False, width=64)
rows = st.integers(min_value=1, max_value=24).flatmap(lambda n: arrays("float64", (3, n), elements=finite))
alphas = st.sampled_from([1.0, 1.2, 1.5, 1.8, 2.0, 2.7])

common = settings(max_examples=60, deadline=None)


@common
@given(rows, alphas)
def test_weights_are_a_distribution(values, alpha):
    p = sparsa.entmax(torch.from_numpy(values), alpha)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-9, rtol=0)


@common
@given(rows, alphas, st.randoms(use_true_random=False))
def test_permutation_equivariance(values, alpha, rng):
    x = torch.from_numpy(values)
    order = list(range(x.shape[-1]))
    rng.shuffle(order)
    order = torch.tensor(order)
    torch.testing.assert_close(sparsa.entmax(x[:, order], alpha), sparsa.entmax(x, alpha)[:, order])


@common
@given(rows, alphas, st.floats(min_value=-100, max_value=100))
def test_shift_invariance(values, alpha, shift):
    x = torch.from_numpy(values)
    torch.testing.assert_close(sparsa.entmax(x + shift, alpha), sparsa.entmax(x, alpha), atol=1e-9, rtol=0)


@common
@given(rows)
def test_sparsity_does_not_decrease_with_alpha(values):
    x = torch.from_numpy(values)
    sizes = [sparsa.support_size(x, alpha) for alpha in (1.0, 1.25, 1.5, 1.75, 2.0, 3.0)]
    for denser, sparser in itertools.pairwise(sizes):
        assert (sparser <= denser).all()


@common
@given(rows.map(lambda a: a / 10))
def test_alpha_near_one_approaches_softmax(values):
    x = torch.from_numpy(values)
    softmax = torch.softmax(x, -1)
    errors = [(sparsa.entmax(x, 1 + eps) - softmax).abs().max().item() for eps in (1e-1, 1e-2, 1e-3)]
    assert errors[-1] < 5e-3
    assert errors[2] <= errors[0] + 1e-12


@common
@given(rows, st.sampled_from([1.5, 2.0]), st.integers(min_value=1, max_value=5))
def test_partial_sort_equals_full_solution(values, alpha, k):
    x = torch.from_numpy(values)
    torch.testing.assert_close(sparsa.entmax(x, alpha, k=k), sparsa.entmax(x, alpha), atol=1e-12, rtol=0)


@common
@given(rows, alphas)
def test_fp32_agrees_with_fp64(values, alpha):
    x = torch.from_numpy(values)
    atol = 5e-4 if alpha > 2 else 1e-6  # alpha > 2: weights ~ u^(1/(alpha-1)) are steep near tau
    torch.testing.assert_close(
        sparsa.entmax(x.float(), alpha).double(), sparsa.entmax(x, alpha), atol=atol, rtol=0
    )
    assert not math.isnan(sparsa.entmax(x.float(), alpha).sum().item())
