import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import sparsa
from sparsa.normalize import Entmax15Loss, EntmaxLoss, SparsemaxLoss


def logits(*shape):
    return (torch.randn(*shape, dtype=torch.float64) * 2).requires_grad_()


def test_alpha_one_is_cross_entropy_with_its_conventions():
    z = logits(6, 5, 3)
    target = torch.randint(0, 5, (6, 3))
    target[0, 0] = 7
    target[2] = 7
    for reduction in ("none", "mean", "sum"):
        got = sparsa.entmax_loss(z, target, 1.0, ignore_index=7, reduction=reduction)
        expected = F.cross_entropy(z, target, ignore_index=7, reduction=reduction)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_loss_is_the_fenchel_young_formula(alpha):
    z = logits(7, 6).detach()
    target = torch.randint(0, 6, (7,))
    p = sparsa.entmax(z, alpha)
    entropy = (1 - p.pow(alpha).sum(-1)) / (alpha * (alpha - 1))
    expected = entropy + (p * z).sum(-1) - z.gather(-1, target[:, None]).squeeze(-1)
    torch.testing.assert_close(sparsa.entmax_loss(z, target, alpha, reduction="none"), expected)
    assert (expected >= -1e-12).all()


@pytest.mark.parametrize("alpha", [1.0, 1.5, 1.75, 2.0])
def test_gradient_is_weights_minus_one_hot_and_gradchecks(alpha):
    z = logits(5, 4)
    target = torch.tensor([0, 3, 1, -100, 2])
    assert gradcheck(lambda t: sparsa.entmax_loss(t, target, alpha, reduction="sum"), (z,))
    sparsa.entmax_loss(z, target, alpha, reduction="sum").backward()
    expected = sparsa.entmax(z.detach(), alpha) - F.one_hot(target.clamp_min(0), 4)
    expected[3] = 0
    torch.testing.assert_close(z.grad, expected)


def test_sparsemax_loss_is_zero_for_a_confident_correct_prediction():
    z = torch.tensor([[5.0, 0.0, 0.0]])
    assert sparsa.sparsemax_loss(z, torch.tensor([0])).item() == 0
    assert sparsa.entmax15_loss(z, torch.tensor([0])).item() == 0
    assert sparsa.entmax15_loss(z, torch.tensor([1])).item() > 0


def test_all_ignored_mean_is_zero_not_nan():
    z = logits(3, 4)
    loss = sparsa.entmax15_loss(z, torch.full((3,), -100))
    assert loss.item() == 0
    loss.backward()
    assert (z.grad == 0).all()


def test_unbatched_half_precision_and_modules():
    z = torch.randn(6).half()
    loss = SparsemaxLoss()(z.unsqueeze(0), torch.tensor([2]))
    assert loss.dtype == torch.float16
    torch.testing.assert_close(sparsa.sparsemax_loss(z, torch.tensor(2)), loss)
    z64 = logits(4, 5).detach()
    target = torch.tensor([1, 2, 3, 4])
    torch.testing.assert_close(
        Entmax15Loss(reduction="sum")(z64, target), sparsa.entmax15_loss(z64, target, reduction="sum")
    )
    torch.testing.assert_close(EntmaxLoss(1.3)(z64, target), sparsa.entmax_loss(z64, target, 1.3))


@pytest.mark.parametrize(
    "call",
    [
        lambda z, t: sparsa.entmax_loss(z, t.float()),
        lambda z, t: sparsa.entmax_loss(z, t, reduction="avg"),
        lambda z, t: sparsa.entmax_loss(z, t[:2]),
        lambda z, t: sparsa.entmax_loss(z, t + 10),
        lambda z, t: sparsa.entmax_loss(z, t, 0.5),
        lambda z, t: sparsa.entmax_loss(z, t, torch.tensor(1.5)),
    ],
)
def test_bad_arguments(call):
    with pytest.raises((ValueError, TypeError)):
        call(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))
