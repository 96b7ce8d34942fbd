"""Intensity windowing, standardisation and augmentation, in torch on whichever device trains.

Images arrive as int16 HU; the window and the standardisation happen here (not at ingest) so that a
new window needs no re-ingest. Augmentation warps image and mask together with one sampled affine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def window01(hu: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """HU (any shape, any dtype) -> float32 in [0, 1]: clip to [low, high] HU and scale."""
    lo, hi = window
    return (hu.float().clamp_(lo, hi) - lo) / (hi - lo)


def standardise(x01: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Windowed [0, 1] -> zero mean, unit std by the training split's statistics."""
    return (x01 - mean) / max(std, 1e-6)


def random_affine(
    image: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
    rotate_deg: float = 15.0,
    zoom: tuple[float, float] = (0.9, 1.1),
    flip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random left-right flip, rotation and zoom, one per sample, same for image and mask.

    image: (N, C, H, W) float in [0, 1] (padding 0 = air after windowing); mask: (N, H, W) integer.
    Returns the warped image (bilinear) and mask (nearest), same shapes and dtypes.
    """
    n, dev = image.shape[0], image.device
    u = torch.rand((n, 3), generator=generator, device=dev)
    angle = (u[:, 0] * 2 - 1) * math.radians(rotate_deg)
    scale = zoom[0] + u[:, 1] * (zoom[1] - zoom[0])
    sign = torch.where((u[:, 2] < 0.5) & flip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * sign, -sin, torch.zeros_like(cos)], 1), torch.stack([sin * sign, cos, torch.zeros_like(cos)], 1)],
        1,
    )
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = F.grid_sample(mask[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out, m[:, 0].to(mask.dtype)
