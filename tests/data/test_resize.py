"""Slice resizing: HU against torch's antialiased bilinear, labels against nearest-exact."""

import numpy as np
import pytest

from liverseg.data.resize import resize_slices


@pytest.mark.parametrize("shape", [(3, 512, 512), (3, 97, 131), (3, 48, 40)])  # down, uneven, up
def test_resize_matches_torch_reference(shape):
    """Pillow's resize (no torch in ingest workers) against torch's antialiased bilinear / nearest-exact."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    hu = rng.normal(0, 300, shape).astype(np.int16)
    labels = rng.integers(0, 3, shape).astype(np.uint8)
    for size in [(128, 128), (100, 77)]:
        t = torch.from_numpy(hu.astype(np.float32))[:, None]
        ref = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)[:, 0].round().numpy()
        ours = resize_slices(hu, size, is_mask=False)
        assert ours.dtype == np.int16 and np.abs(ours - ref).max() <= 1  # rounding of float32 sums
        assert np.array_equal(ours, resize_slices(hu, size, is_mask=False, threads=3))
        t = torch.from_numpy(labels.astype(np.float32))[:, None]
        ref = F.interpolate(t, size=size, mode="nearest-exact")[:, 0].to(torch.uint8).numpy()
        assert np.array_equal(resize_slices(labels, size, is_mask=True), ref)
