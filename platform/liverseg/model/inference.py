"""Inference on whole CT volumes and NIfTI files: orientation, resampling to the model's size and back,
and writing masks. The model itself, its preprocessing and post-processing are `artifact`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from liverseg.core.errors import InputError
from liverseg.core.limits import MAX_SLICES
from liverseg.data.lits import check_slices, from_canonical, to_canonical, to_hu_int16
from liverseg.data.resize import resize_slices
from liverseg.model.artifact import LoadedModel, keep_largest_component, liver_probability
from liverseg.model.plots import mask_overlay_png

if TYPE_CHECKING:
    import nibabel as nib


class Timer(dict):
    """Seconds per named phase: `with timer("model"): ...` adds to timer["model"]."""

    def __call__(self, phase: str):
        import contextlib
        import time

        @contextlib.contextmanager
        def span():
            t0 = time.perf_counter()
            try:
                yield
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self[phase] = self.get(phase, 0.0) + time.perf_counter() - t0

        return span()


def segment_canonical(
    lm: LoadedModel, image_zyx: np.ndarray, lcc: bool | None = None, batch: int = 64, timer: Timer | None = None
) -> np.ndarray:
    """(Z, Y, X) int16 HU in canonical orientation, any in-plane size -> (Z, Y, X) uint8 liver mask.

    lcc: keep the largest connected component (None: the model spec's default)."""
    timer = timer if timer is not None else Timer()
    with timer("preprocess"):
        small = resize_slices(image_zyx, tuple(lm.spec.size), is_mask=False, threads=torch.get_num_threads())
    with timer("model"):
        prob = liver_probability(lm, small, batch)
    with timer("postprocess"):
        if lm.spec.lcc if lcc is None else lcc:  # at model size, before resampling
            prob = keep_largest_component(prob)
        if prob.shape[1:] != image_zyx.shape[1:]:  # probabilities, not labels, are resampled back
            prob = F.interpolate(prob[:, None], size=image_zyx.shape[1:], mode="bilinear", align_corners=False)[:, 0]
        mask = (prob > 0.5).cpu().numpy()
    return mask.astype(np.uint8)


def segment_volume(
    lm: LoadedModel, volume: np.ndarray, affine: np.ndarray, lcc: bool | None = None, batch: int = 64
) -> np.ndarray:
    """A CT volume on its own grid, any orientation: (X, Y, Z) HU + 4x4 affine -> (X, Y, Z) uint8 mask."""
    if volume.ndim != 3:
        raise InputError(f"volume must be 3-D, got shape {volume.shape}")
    image, _ = to_canonical(to_hu_int16(np.asarray(volume)), np.asarray(affine, dtype=np.float64))
    return from_canonical(segment_canonical(lm, image, lcc, batch), affine)


def mask_nifti_bytes(mask_xyz: np.ndarray, header: nib.Nifti1Header, affine: np.ndarray, gz: bool = True) -> bytes:
    """A uint8 mask as NIfTI bytes on the grid of the image with `header` and `affine` (codes and zooms kept)."""
    import nibabel as nib
    from isal import igzip

    hdr = header.copy()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape(mask_xyz.shape)
    img = nib.Nifti1Image(mask_xyz.astype(np.uint8, copy=False), affine, header=hdr)
    img.header.set_slope_inter(1.0, 0.0)
    raw = img.to_bytes()
    return igzip.compress(raw, compresslevel=1, mtime=0) if gz else raw  # ISA-L: ~3x zlib's speed


def predict_file(
    lm: LoadedModel,
    src: str | Path,
    dst: str | Path,
    lcc: bool | None = None,
    overlay: str | Path | None = None,
    truth: str | Path | None = None,
    max_slices: int = MAX_SLICES,
) -> Timer:
    """Segment one NIfTI CT into a uint8 mask NIfTI with exactly the input's shape and affine.

    overlay: optional PNG of an axial and a coronal slice with the mask (and `truth`, a LiTS
    segmentation of the same grid, for comparison).
    """
    from liverseg.core.files import atomic_write_bytes
    from liverseg.data.lits import CasePaths, read_case, read_volume

    timer = Timer()
    with timer("read"):
        vol = read_case(CasePaths("truth", Path(src), Path(truth))) if truth else read_volume(src)
    check_slices(vol.image, Path(src).name, max_slices)
    mask = segment_canonical(lm, vol.image, lcc, timer=timer)
    with timer("write"):
        out = from_canonical(mask, vol.affine).reshape(vol.shape)
        atomic_write_bytes(dst, mask_nifti_bytes(out, vol.header, vol.affine, gz=str(dst).endswith(".gz")))
    if overlay:
        with timer("overlay"):
            mask_overlay_png(vol.image, mask, vol.spacing, lm.spec.window, overlay, vol.mask, Path(src).name)
    return timer
