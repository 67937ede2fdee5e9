import pytest
import torch
from torch.autograd import gradcheck

import sparsa


def scores(*shape):
    return (torch.randn(*shape, dtype=torch.float64) * 2).requires_grad_()


@pytest.mark.parametrize("alpha", [1.0, 1.25, 1.5, 1.75, 2.0, 2.5])
def test_gradcheck_scores(alpha):
    x = scores(5, 7)
    assert gradcheck(lambda t: sparsa.entmax(t, alpha), (x,))


@pytest.mark.parametrize("fn", [sparsa.entmax15, sparsa.sparsemax])
def test_gradcheck_exact_maps_with_partial_sort_and_dim(fn):
    x = scores(4, 6, 3)
    assert gradcheck(lambda t: fn(t, dim=1, k=2), (x,))


def test_gradcheck_per_row_alpha_including_its_gradient():
    x = scores(4, 8)
    alpha = torch.tensor([[1.2], [1.5], [1.8], [2.3]], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t, a: sparsa.entmax(t, a), (x, alpha))


def test_gradcheck_broadcast_per_head_alpha():
    x = scores(2, 3, 4, 5)
    alpha = torch.tensor([1.3, 1.5, 1.7], dtype=torch.float64).view(3, 1, 1).requires_grad_()
    assert gradcheck(lambda t, a: sparsa.entmax(t, a), (x, alpha))


def test_alpha_gradient_at_one_is_the_one_sided_limit():
    x = scores(3, 6).detach()
    upstream = torch.randn(3, 6, dtype=torch.float64)
    alpha = torch.ones(3, 1, dtype=torch.float64, requires_grad=True)
    (sparsa.entmax(x, alpha) * upstream).sum().backward()
    h = 1e-6
    difference = (sparsa.entmax(x, 1 + h) - sparsa.entmax(x, 1.0)) / h
    torch.testing.assert_close(
        alpha.grad, (difference * upstream).sum(-1, keepdim=True), atol=1e-4, rtol=1e-4
    )


def test_learnable_alpha_trains():
    torch.manual_seed(1)
    x = torch.randn(32, 10, dtype=torch.float64)
    target = sparsa.entmax(x, 1.8)
    raw = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)  # alpha = 1 + sigmoid(raw) = 1.5
    optimizer = torch.optim.Adam([raw], lr=0.1)
    for _ in range(150):
        optimizer.zero_grad()
        loss = (sparsa.entmax(x, 1 + torch.sigmoid(raw)) - target).pow(2).sum()
        loss.backward()
        optimizer.step()
    assert abs(1 + torch.sigmoid(raw).item() - 1.8) < 0.02


@pytest.mark.parametrize("alpha", [1.0, 1.5, 1.3, 2.0])
def test_backward_matches_autograd_through_the_formula(alpha):
    x = scores(6, 9)
    tau = sparsa.entmax_threshold(x.detach(), alpha) if alpha != 1.0 else None
    upstream = torch.randn(6, 9, dtype=torch.float64)
    (sparsa.entmax(x, alpha) * upstream).sum().backward()
    y = x.detach().clone().requires_grad_()
    if alpha == 1.0:
        direct = torch.softmax(y, -1)
    else:
        # Implicit differentiation by hand: tau moves with z so that the weights keep summing
        # to one, dtau = sum(f' dz) / sum(f') with f' the derivative of u^power on the support.
        z = (alpha - 1) * y
        power = 1 / (alpha - 1)
        slope = ((z - tau).clamp_min(0).pow(power - 1) * (z > tau)).detach()
        moved_tau = tau + (slope * (z - z.detach())).sum(-1, keepdim=True) / slope.sum(-1, keepdim=True)
        direct = (z - moved_tau).clamp_min(0).pow(power)
    (direct * upstream).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-9, rtol=1e-7)


def test_fully_masked_rows_have_zero_gradient_for_alpha_too():
    x = scores(2, 4).detach()
    x[0] = -float("inf")
    x.requires_grad_()
    alpha = torch.full((2, 1), 1.4, dtype=torch.float64, requires_grad=True)
    sparsa.entmax(x, alpha).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(alpha.grad).all()
    assert (x.grad[0] == 0).all() and alpha.grad[0].item() == 0
