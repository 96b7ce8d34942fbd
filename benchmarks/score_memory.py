"""Peak memory and seconds of `liverseg score` on the largest masks the readers allow (core/limits.py
MAX_VOXELS, as a 512x512xN uint8 .nii.gz pair), one fresh process per case. Prints one JSON line per case.

Cases: `liver` (an ellipsoid of liver size, the prediction shifted by 2 voxels: the surface-distance
work is cropped to the liver), `corners` (one voxel in opposite corners of the volume: the crop is the
whole volume, the worst case for the distance transforms).

    PYTHONPATH=platform python benchmarks/score_memory.py [--slices 1024] [--cases liver corners]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

# peak RSS of the child (`ru_maxrss`, KiB on Linux), measured by a process that runs only that child
WRAPPER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.stderr.strip()[-300:])"
)


def _masks(kind: str, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros(shape, np.uint8)
    if kind == "liver":
        x, y, z = np.ogrid[: shape[0], : shape[1], : shape[2]]
        c = [s // 2 for s in shape]
        ref[((x - c[0]) / 110) ** 2 + ((y - c[1]) / 80) ** 2 + ((z - c[2]) / 90) ** 2 <= 1] = 1
        return np.roll(ref, 2, axis=0), ref
    ref[0, 0, 0] = ref[-1, -1, -1] = 1
    pred = np.zeros(shape, np.uint8)
    pred[1, 1, 1] = pred[-2, -2, -2] = 1
    return pred, ref


def main() -> None:
    from liverseg.core import limits

    limit = getattr(limits, "MAX_VOXELS", None)  # None: code from before the readers had the limit
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=(limit or 512 * 512 * 1024) // (512 * 512))
    p.add_argument("--cases", nargs="+", default=["liver", "corners"])
    a = p.parse_args()
    shape = (512, 512, a.slices)
    affine = np.diag([0.7, 0.7, 1.0, 1.0])
    with tempfile.TemporaryDirectory() as tmp:
        for kind in a.cases:
            pred, ref = _masks(kind, shape)
            paths = [Path(tmp) / f"{kind}-{name}.nii.gz" for name in ("pred", "ref")]
            for path, arr in zip(paths, (pred, ref)):
                nib.save(nib.Nifti1Image(arr, affine), str(path))
            del pred, ref
            cmd = [sys.executable, "-m", "liverseg.cli", "score", "--pred", str(paths[0]), "--ref", str(paths[1])]
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True).stdout
            seconds = time.perf_counter() - t0
            rc, kib, err = out.split(" ", 2)
            print(
                json.dumps(
                    {
                        "case": kind,
                        "shape": list(shape),
                        "voxels": int(np.prod(shape)),
                        "limit": limit,
                        "exit": int(rc),
                        "peak_rss_mb": round(int(kib) / 1024),
                        "seconds": round(seconds, 1),
                        "error": err.strip() or None,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
