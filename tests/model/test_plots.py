"""Overlay figures: the slice chosen, the contours drawn, the file written whole."""

import matplotlib.image as mpimg
import numpy as np

from liverseg.model.plots import mask_overlay_png


def _colour_pixels(png, rgb) -> int:
    img = mpimg.imread(png)[..., :3]
    return int((np.abs(img - np.array(rgb)).max(-1) < 0.15).sum())


def test_overlay_picks_largest_liver_slice(tmp_path):
    image = np.full((12, 40, 40), -1000, np.int16)
    image[:, 5:35, 5:35] = 40
    mask = np.zeros(image.shape, np.uint8)
    mask[3:9, 10:20, 12:30] = 1
    mask[7, 8:24, 10:32] = 2  # z=7 has the most liver (tumour counts as liver)
    truth = np.roll(mask, 3, axis=2)
    out = tmp_path / "o.png"
    z, y = mask_overlay_png(image, mask, (0.8, 0.8, 2.5), (-100, 200), out, truth=truth, title="case")
    assert (z, y) == (7, 16)  # rows 8..23 at z=7: centre 15.5, rounded half to even
    assert _colour_pixels(out, (1, 0, 0)) > 50 and _colour_pixels(out, (0, 1, 0)) > 50
    assert not list(tmp_path.glob("*.tmp*"))


def test_overlay_without_truth_or_liver(tmp_path):
    image = np.zeros((4, 16, 16), np.int16)
    out = tmp_path / "o.png"
    z, y = mask_overlay_png(image, np.zeros(image.shape, np.uint8), (1, 1, 1), (-100, 200), out)
    assert (z, y) == (0, 8)
    assert _colour_pixels(out, (1, 0, 0)) == 0 and _colour_pixels(out, (0, 1, 0)) == 0


def test_overlay_radiological_convention(tmp_path):
    """Liver on the patient's right (+x in RAS) is drawn on the viewer's left."""
    image = np.zeros((6, 40, 40), np.int16)
    mask = np.zeros(image.shape, np.uint8)
    mask[:, 15:25, 30:38] = 1
    out = tmp_path / "o.png"
    mask_overlay_png(image, mask, (1, 1, 1), (-100, 200), out)
    img = mpimg.imread(out)[..., :3]
    axial = img[:, : img.shape[1] // 2]  # left panel
    cols = np.nonzero((np.abs(axial - [1, 0, 0]).max(-1) < 0.15).any(0))[0]
    assert len(cols) and cols.mean() < axial.shape[1] / 2
