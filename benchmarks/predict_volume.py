"""`liverseg predict` on one large CT (default 512x512x400): seconds per phase. Prints JSON.

python benchmarks/predict_volume.py --shape 512 512 400 --encoder resnet50 [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def main() -> None:
    from liverseg.model.artifact import ModelSpec, load_local, save_local
    from liverseg.model.inference import predict_file
    from liverseg.model.network import build_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 400])
    p.add_argument("--encoder", default="resnet50")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        vol = rng.integers(-1000, 400, a.shape, dtype=np.int16)
        nib.save(nib.Nifti1Image(vol, np.diag([-0.7, -0.7, 1.0, 1.0])), str(tmp / "ct.nii.gz"))
        spec = ModelSpec(a.encoder, 1, (-200.0, 250.0), 0.2, 0.3, (a.size, a.size))
        save_local(tmp / "m", build_model(a.encoder, "none", 1).state_dict(), spec)
        lm = load_local(tmp / "m", a.device)
        predict_file(lm, tmp / "ct.nii.gz", tmp / "warm.nii.gz")  # warm-up (cuDNN autotune, allocator)
        t0 = time.perf_counter()
        t = predict_file(lm, tmp / "ct.nii.gz", tmp / "mask.nii.gz")
        total = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "device": str(lm.device),
                "shape": a.shape,
                "encoder": a.encoder,
                "total_s": total,
                **{f"{k}_s": v for k, v in t.items()},
                "model_fraction": t["model"] / total,
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )


if __name__ == "__main__":
    main()
