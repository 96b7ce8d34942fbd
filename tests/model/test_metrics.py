import math

import numpy as np
import pytest

from liverseg.model.metrics import counts, largest_component, overlap_scores, score_volume, surface_distances


def test_overlap_known_values():
    ref = np.zeros((4, 4), np.uint8)
    ref[:2, :] = 1  # 8 voxels
    pred = np.zeros((4, 4), np.uint8)
    pred[1:3, :] = 2  # tumour label counts as liver; 8 voxels, 4 overlap
    assert counts(pred, ref) == (4, 4, 4, 4)
    s = overlap_scores(*counts(pred, ref))
    assert s["dice"] == pytest.approx(0.5)
    assert s["iou"] == pytest.approx(1 / 3)
    assert s["voe"] == pytest.approx(2 / 3)
    assert s["rvd"] == pytest.approx(0.0)
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["precision"] == pytest.approx(0.5)
    assert s["recall"] == pytest.approx(0.5)


def test_rvd_sign_and_precision_recall():
    s = overlap_scores(tp=6, fp=4, fn=0, tn=0)
    assert s["rvd"] == pytest.approx(4 / 6)
    assert s["precision"] == pytest.approx(0.6) and s["recall"] == 1.0


def test_empty_masks():
    z = np.zeros((3, 3, 3), np.uint8)
    one = z.copy()
    one[1, 1, 1] = 1
    both = score_volume(z, z, (1, 1, 1))
    assert both["dice"] == 1.0 and both["assd_mm"] == 0.0 and both["rvd"] == 0.0
    miss = score_volume(z, one, (1, 1, 1))
    assert miss["dice"] == 0.0 and math.isinf(miss["hd95_mm"]) and miss["rvd"] == -1.0
    extra = score_volume(one, z, (1, 1, 1))
    assert extra["dice"] == 0.0 and math.isinf(extra["rvd"])


def _ball(shape, center, r, spacing=(1.0, 1.0, 1.0)):
    g = np.meshgrid(*[np.arange(s) * sp for s, sp in zip(shape, spacing)], indexing="ij")
    return sum((gi - c) ** 2 for gi, c in zip(g, center)) <= r * r


def test_surface_distance_of_shifted_cube_is_the_shift():
    a = np.zeros((30, 30, 30), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 3, axis=0)
    d = surface_distances(b, a, (1.0, 1.0, 1.0))
    assert d["msd_mm"] == pytest.approx(3.0)
    assert 0 < d["assd_mm"] <= 3.0
    d2 = surface_distances(b, a, (2.0, 1.0, 1.0))  # anisotropic: the shift is 6 mm
    assert d2["msd_mm"] == pytest.approx(6.0)


def test_concentric_spheres_distance_is_radius_difference():
    shape, c = (60, 60, 60), (30, 30, 30)
    d = surface_distances(_ball(shape, c, 20), _ball(shape, c, 14), (1.0, 1.0, 1.0))
    assert d["assd_mm"] == pytest.approx(6.0, abs=0.8)
    assert d["hd95_mm"] == pytest.approx(6.0, abs=1.0)


def test_identical_masks_distance_zero():
    a = _ball((20, 20, 20), (10, 10, 10), 6)
    d = surface_distances(a, a, (0.7, 0.7, 2.5))
    assert d == {"assd_mm": 0.0, "msd_mm": 0.0, "hd95_mm": 0.0}


def test_largest_component_keeps_biggest():
    m = np.zeros((10, 10, 10), bool)
    m[0:2, 0:2, 0:2] = True
    m[5:9, 5:9, 5:9] = True
    out = largest_component(m)
    assert out.sum() == 64 and not out[0, 0, 0]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        counts(np.zeros((2, 2)), np.zeros((3, 3)))


def test_surface_distances_match_scipys_distance_map():
    """Distances from the feature transform alone (a quarter of the memory) are bit-identical to reading
    scipy's distance map at the surface points, on random masks and anisotropic spacings."""
    from scipy import ndimage

    from liverseg.model.metrics import _distances

    rng = np.random.default_rng(0)
    for _ in range(10):
        shape = tuple(int(s) for s in rng.integers(5, 30, 3))
        a, b = (rng.random(shape) > rng.uniform(0.5, 0.99) for _ in range(2))
        a[0, 0, 0] = b[-1, -1, -1] = True
        spacing = tuple(float(s) for s in rng.uniform(0.3, 3.0, 3))
        expected = ndimage.distance_transform_edt(~b, sampling=spacing)[a]
        np.testing.assert_array_equal(_distances(b, a, spacing), expected)
