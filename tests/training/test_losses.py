import math

import pytest
import torch

from liverseg.training.losses import HybridLoss, soft_dice_loss


def _logits(prob_fg: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax gives exactly prob_fg for class 1."""
    p = prob_fg.clamp(1e-7, 1 - 1e-7)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], 1)


def test_soft_dice_known_value():
    target = torch.tensor([[[1, 1], [0, 0]]])
    prob = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # tp 1, |p| 2, |g| 2
    assert soft_dice_loss(_logits(prob), target, smooth=0.0).item() == pytest.approx(0.5, abs=1e-5)
    assert soft_dice_loss(_logits(target.float()), target, smooth=0.0).item() == pytest.approx(0.0, abs=1e-5)


def test_soft_dice_empty_slice_is_zero_loss_with_smoothing():
    target = torch.zeros((1, 2, 2), dtype=torch.long)
    prob = torch.zeros((1, 2, 2))
    assert soft_dice_loss(_logits(prob), target).item() == pytest.approx(0.0, abs=1e-5)


def test_hybrid_is_weighted_sum():
    target = torch.tensor([[[1, 0], [0, 1]]])
    prob = torch.full((1, 2, 2), 0.5)
    logits = _logits(prob)
    ce = math.log(2)  # p = 0.5 everywhere
    dice = soft_dice_loss(logits, target).item()
    assert HybridLoss(1.0, 0.0)(logits, target).item() == pytest.approx(ce, abs=1e-5)
    assert HybridLoss(0.5, 2.0)(logits, target).item() == pytest.approx(0.5 * ce + 2 * dice, abs=1e-5)


def test_loss_has_gradient():
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    HybridLoss()(logits, torch.randint(0, 2, (2, 8, 8))).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
