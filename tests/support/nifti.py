"""NIfTI files for tests: LiTS pairs copied (and renumbered), hostile headers."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np


def copy_case(src: Path, dst: Path, n: str = "0", new_id: str | None = None) -> None:
    """Copy one LiTS pair (volume-n, segmentation-n) into dst, optionally renumbered."""
    dst.mkdir(parents=True, exist_ok=True)
    for kind in ("volume", "segmentation"):
        for f in src.glob(f"{kind}-{n}.nii*"):
            shutil.copy(f, dst / f.name.replace(f"-{n}.", f"-{new_id or n}."))


def nifti2_declaring(dims: tuple[int, int, int], data: bytes = bytes(64), nifti1: bool = False) -> bytes:
    """A NIfTI-2 (or NIfTI-1) file whose header declares `dims` (uint8) over `data` (which may be far fewer
    bytes)."""
    image, header = (nib.Nifti1Image, nib.Nifti1Header) if nifti1 else (nib.Nifti2Image, nib.Nifti2Header)
    raw = image(np.zeros((2, 2, 2), np.uint8), np.eye(4)).to_bytes()
    hdr = header.from_fileobj(io.BytesIO(raw))
    hdr["dim"][1:4] = dims
    block = hdr.binaryblock
    return block + raw[len(block) : int(hdr["vox_offset"])] + data
