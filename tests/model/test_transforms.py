import torch

from liverseg.model.transforms import random_affine, standardise, window01


def test_window_clips_and_scales():
    hu = torch.tensor([-1000, -200, 25, 250, 3000], dtype=torch.int16)
    out = window01(hu, (-200, 250))
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert torch.allclose(standardise(torch.tensor([0.5]), 0.25, 0.5), torch.tensor([0.5]))


def test_affine_moves_image_and_mask_together():
    img = torch.zeros(4, 1, 32, 32)
    img[:, :, 8:16, 4:12] = 1.0
    mask = (img[:, 0] > 0.5).long()
    g = torch.Generator().manual_seed(0)
    out, m = random_affine(img, mask, g, rotate_deg=20, zoom=(0.9, 1.1))
    assert out.shape == img.shape and m.shape == mask.shape and m.dtype == mask.dtype
    assert set(m.unique().tolist()) <= {0, 1}
    agree = ((out[:, 0] > 0.5).long() == m).float().mean()
    assert agree > 0.97  # the mask follows the image
    assert not torch.equal(m, mask)  # and something did move


def test_affine_is_seeded():
    img = torch.rand(2, 1, 16, 16)
    mask = (img[:, 0] > 0.5).long()
    a = random_affine(img, mask, torch.Generator().manual_seed(5))
    b = random_affine(img, mask, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_identity_when_ranges_are_zero():
    img = torch.rand(2, 1, 16, 16)
    mask = (img[:, 0] > 0.5).long()
    out, m = random_affine(img, mask, torch.Generator().manual_seed(1), rotate_deg=0, zoom=(1, 1), flip=False)
    assert torch.allclose(out, img, atol=1e-5) and torch.equal(m, mask)


def test_grid_is_affine_grid_of_the_sampled_transform():
    """The broadcast grid equals F.affine_grid of theta = [[cos*s, -sin, 0], [sin*s, cos, 0]] / zoom."""
    import math

    import torch.nn.functional as F

    img = torch.rand(6, 1, 24, 40)  # not square: x and y must not be swapped
    mask = (torch.rand(6, 24, 40) > 0.5).long()
    out, m = random_affine(img, mask, torch.Generator().manual_seed(3), rotate_deg=30, zoom=(0.8, 1.2))
    u = torch.rand((6, 3), generator=torch.Generator().manual_seed(3))
    angle, scale = (u[:, 0] * 2 - 1) * math.radians(30), 0.8 + u[:, 1] * 0.4
    sign = torch.where(u[:, 2] < 0.5, -1.0, 1.0)
    c, s = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([c * sign, -s, 0 * c], 1), torch.stack([s * sign, c, 0 * c], 1)], 1)
    grid = F.affine_grid(theta, [6, 1, 24, 40], align_corners=False)
    ref = F.grid_sample(img, grid, mode="bilinear", align_corners=False)
    ref_m = F.grid_sample(mask[:, None].float(), grid, mode="nearest", align_corners=False)[:, 0].long()
    assert torch.allclose(out, ref, atol=1e-5)
    assert (m != ref_m).float().mean() < 1e-3  # nearest may round a pixel centre on an edge either way
