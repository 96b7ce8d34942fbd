import hashlib

import numpy as np

from liverseg.data.lits import discover, read_case
from liverseg.data.phantoms import make_phantom, write_phantoms


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_byte_identical_for_a_seed(tmp_path):
    write_phantoms(tmp_path / "a", 2, seed=7, shape=(48, 48, 16))
    write_phantoms(tmp_path / "b", 2, seed=7, shape=(48, 48, 16))
    write_phantoms(tmp_path / "c", 2, seed=8, shape=(48, 48, 16))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_anatomy_defeats_a_threshold():
    hu, lab, spacing = make_phantom(0, 0, (96, 96, 32))
    liver = lab >= 1
    assert liver.sum() > 0.03 * liver.size
    lo, hi = np.percentile(hu[lab == 1], [5, 95])
    in_range = (hu >= lo) & (hu <= hi)
    # spleen, kidneys and vessels share the liver's HU range: the best HU window stays below 0.9 Dice
    threshold_dice = 2 * (in_range & liver).sum() / (in_range.sum() + liver.sum())
    assert threshold_dice < 0.9 and (in_range & ~liver).sum() > 0.1 * liver.sum()
    assert hu.min() <= -1000 + 50 and hu.max() > 300  # air and bone
    assert spacing[0] == spacing[1] and 1.0 < spacing[2] < 3.1


def test_varied_cases_and_readable(tmp_path):
    write_phantoms(tmp_path, 3, seed=1, shape=(48, 48, 16))
    cases, errors = discover(tmp_path)
    assert errors == [] and len(cases) == 3
    vols = [read_case(c) for c in cases]
    centres = [np.argwhere(v.mask >= 1).mean(0) for v in vols]
    assert np.ptp(np.array(centres), axis=0).max() > 0.5  # the liver moves between cases
    # LPS (even) and RAS (odd) files land in the same canonical frame: liver on the same side
    assert all(c[2] > vols[0].image.shape[2] / 2 for c in centres)


def test_tumours_are_inside_the_liver_and_darker():
    """Some cases have tumours (label 2), always inside the liver and darker than its parenchyma."""
    with_tumours = 0
    for case in range(6):
        hu, lab, _ = make_phantom(0, case, (96, 96, 32))
        if (lab == 2).any():
            with_tumours += 1
            assert hu[lab == 2].mean() < hu[lab == 1].mean() - 10
    assert 0 < with_tumours < 6
