"""Hybrid segmentation loss: w_ce * cross-entropy + w_dice * soft Dice of the liver class."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SMOOTH = 1.0  # keeps the loss defined (and ~0) on slices without liver


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    """1 - soft Dice of class 1 over the whole batch.

    logits: (N, 2, H, W) float; target: (N, H, W) integer {0, 1}. Returns a scalar in [0, 1].
    """
    p = logits.float().softmax(1)[:, 1]
    g = (target == 1).float()
    inter = (p * g).sum()
    return 1 - (2 * inter + smooth) / (p.sum() + g.sum() + smooth)


class HybridLoss:
    """`ce_weight * CE + dice_weight * soft Dice`; both weights are searched by Ray Tune."""

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0):
        self.ce_weight, self.dice_weight = ce_weight, dice_weight

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits.float(), target.long())
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, target)
        return loss
