"""Synthetic LiTS-like abdominal CT phantoms (deterministic per seed, byte-identical files).

Each phantom has a body outline (fat, muscle), a liver-shaped organ at ~100 HU (portal-venous phase) with tumours (label 2),
and neighbours of liver-like density (spleen ~100 HU, kidneys, IVC, aorta, spine) so that a HU
threshold alone cannot segment the liver; plus correlated noise and a scanner-like affine (LPS or RAS).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from liverseg.core.files import atomic_write_bytes


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], coarse: int = 6) -> np.ndarray:
    """Low-frequency noise in about [-1, 1] (organ shape irregularity)."""
    base = rng.standard_normal((coarse, coarse, coarse))
    return ndimage.zoom(base, [s / coarse for s in shape], order=3)[: shape[0], : shape[1], : shape[2]]


def _ellipsoid(g: tuple[np.ndarray, ...], center, radii) -> np.ndarray:
    return sum(((gi - c) / r) ** 2 for gi, c, r in zip(g, center, radii))


def _add_tumours(rng, g, hu: np.ndarray, liver: np.ndarray, liver_hu: float) -> np.ndarray:
    """0-3 tumours inside the liver, darker than parenchyma (written into `hu`); labels 0/1/2 (X, Y, Z) uint8."""
    labels = liver.astype(np.uint8)
    for _ in range(int(rng.integers(0, 4))):
        inside = np.argwhere(liver)
        if len(inside) == 0:
            break
        c = inside[rng.integers(len(inside))]
        r = rng.uniform(0.04, 0.1)
        t = _ellipsoid(g, tuple(gi[tuple(c)] for gi in g), (r, r, r * 1.2)) <= 1
        t &= liver
        hu[t] = liver_hu - rng.uniform(20, 40)
        labels[t] = 2
    return labels


def make_phantom(seed: int, case: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom in RAS+ voxel order.

    Returns (hu (X, Y, Z) int16 HU, labels (X, Y, Z) uint8 {0,1,2}, spacing (3,) mm).
    """
    rng = np.random.default_rng([seed, case])
    X, Y, Z = shape
    g = np.meshgrid(np.linspace(-1, 1, X), np.linspace(-1, 1, Y), np.linspace(-1, 1, Z), indexing="ij")
    x, y, z = g
    jitter = lambda s: rng.uniform(-s, s)  # noqa: E731
    hu = np.full(shape, -1000.0, dtype=np.float32)

    a, b = 0.86 + jitter(0.08), 0.68 + jitter(0.08)
    cx, cy = jitter(0.05), jitter(0.05)
    taper = 1 + 0.06 * z
    r_body = ((x - cx) / (a * taper)) ** 2 + ((y - cy) / (b * taper)) ** 2
    hu[r_body <= 1] = -100 + jitter(10)  # subcutaneous fat
    hu[r_body <= 0.86] = 55 + jitter(5)  # abdominal wall muscle
    hu[r_body <= 0.76] = 35 + jitter(5)  # bowel and soft tissue
    gas = (_smooth_field(rng, shape, 10) > 1.6) & (r_body <= 0.6) & (x < 0.1)
    hu[gas] = -800

    zc = jitter(0.15)
    kid = 40 + jitter(10)
    for side in (-1, 1):  # kidneys: cortex enhances, medulla ~ liver-like
        e = _ellipsoid(g, (side * 0.33, cy - 0.38, zc - 0.25), (0.11, 0.13, 0.3))
        hu[e <= 1] = 150 + jitter(20)
        hu[e <= 0.45] = kid
    spleen_hu = 100 + jitter(10)  # as dense as liver on purpose (portal-venous phase)
    hu[_ellipsoid(g, (cx - 0.5, cy - 0.12, zc + 0.15), (0.15, 0.2, 0.3)) + 0.2 * _smooth_field(rng, shape) <= 1] = (
        spleen_hu
    )
    hu[_ellipsoid(g, (cx - 0.08, cy - 0.42, 0), (0.06, 0.06, 9)) <= 1] = 170 + jitter(20)  # aorta
    ivc = _ellipsoid(g, (cx + 0.14, cy - 0.32, 0), (0.07, 0.06, 9)) <= 1
    e_vert = _ellipsoid(g, (cx, cy - 0.6, 0), (0.13, 0.11, 9))
    hu[e_vert <= 1] = 750 + jitter(80)
    hu[e_vert <= 0.6] = 300 + jitter(60)

    lc = (cx + 0.33 + jitter(0.06), cy + 0.05 + jitter(0.06), zc + 0.1)
    lr = (0.36 + jitter(0.05), 0.42 + jitter(0.05), 0.45 + jitter(0.08))
    lobe = _ellipsoid(g, (lc[0] - 0.35, lc[1] + 0.15, lc[2] + 0.15), (0.25, 0.18, 0.25))
    liver = (np.minimum(_ellipsoid(g, lc, lr), lobe) + 0.25 * _smooth_field(rng, shape) <= 1) & (r_body <= 0.74)
    liver &= ~ivc
    liver_hu = 100 + jitter(10)  # portal-venous liver ~100 HU, spleen alike, muscle ~50
    hu[liver] = liver_hu
    hu[ivc] = 110 + jitter(20)
    labels = _add_tumours(rng, g, hu, liver, liver_hu)

    noise = rng.standard_normal(shape).astype(np.float32) * 14
    hu += ndimage.gaussian_filter(noise, 0.7) * 1.6
    spacing = np.array([rng.uniform(340, 420) / X, 0, rng.uniform(1.5, 3.0)])
    spacing[1] = spacing[0]
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), labels, spacing


def _nifti_gz(arr: np.ndarray, affine: np.ndarray) -> bytes:
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)  # mtime=0: byte-identical output


def write_phantoms(
    out: str | Path, cases: int, seed: int = 0, shape: tuple[int, int, int] = (128, 128, 64)
) -> list[Path]:
    """Write `volume-N.nii.gz` / `segmentation-N.nii.gz` for N in 0..cases-1; returns the volume paths.

    Even cases are stored LPS (as most LiTS files), odd ones RAS, so readers must reorient.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(cases):
        hu, lab, sp = make_phantom(seed, n, shape)
        origin = np.array([-sp[0] * shape[0] / 2, -sp[1] * shape[1] / 2, -sp[2] * shape[2] / 2])
        if n % 2 == 0:  # LPS: flip x and y, as DICOM-derived files are
            hu, lab = hu[::-1, ::-1], lab[::-1, ::-1]
            affine = np.diag([-sp[0], -sp[1], sp[2], 1.0])
            affine[:3, 3] = [-origin[0], -origin[1], origin[2]]
        else:
            affine = np.diag([sp[0], sp[1], sp[2], 1.0])
            affine[:3, 3] = origin
        vol = out / f"volume-{n}.nii.gz"
        atomic_write_bytes(vol, _nifti_gz(np.ascontiguousarray(hu), affine))
        atomic_write_bytes(out / f"segmentation-{n}.nii.gz", _nifti_gz(np.ascontiguousarray(lab), affine))
        paths.append(vol)
    return paths
