"""Ingest throughput vs nibabel's decode alone, and random-slice reads from the store vs numpy. JSON.

The decode baseline runs in a pool of `--workers` processes started before timing. Ingest is timed
twice: end to end (its own pool start-up included) on all cases, and at the margin, the time that the
second half of the cases adds (a 131-volume LiTS ingest runs at that rate once its workers are up).

    python benchmarks/store_io.py --cases 8 --shape 512 512 100 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np


def _decode(path: str) -> int:
    return int(np.asanyarray(nib.load(path).dataobj).size)


def _decode_s(files: list[str], workers: int) -> float:
    """Seconds for nibabel to decode every file, `workers` processes (started before timing)."""
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(_decode, files[:2]))
        t0 = time.perf_counter()
        list(pool.map(_decode, files))
        return time.perf_counter() - t0


def _ingest(tmp: Path, raw: Path, cases: int, workers: int) -> dict:
    """Ingest the first half of the cases, then all of them: seconds each and the half's MB."""
    from liverseg.core.config import IngestConfig
    from liverseg.data.ingest import ingest

    half = tmp / "half"
    half.mkdir()
    for f in raw.glob("*.nii.gz"):  # the volume/segmentation pairs of the first half of the cases
        if int(f.name.split("-")[1].split(".")[0]) < cases // 2:
            (half / f.name).symlink_to(f)
    out = {"half_mb": sum(os.path.getsize(f.resolve()) for f in half.iterdir()) / 1e6}
    for name, folder in (("half", half), ("all", raw)):
        t0 = time.perf_counter()
        rep = ingest(folder, tmp / f"{name}.zarr", IngestConfig(workers=workers), progress=False)
        out[name] = time.perf_counter() - t0
        assert rep.ok
    return out


def _reads(store_path: Path, reads: int) -> dict:
    """Random single-slice reads from the store and from memory; whole-case reads."""
    from liverseg.data.store import SliceStore

    st = SliceStore(str(store_path))
    rng = np.random.default_rng(0)
    picks = [(c, int(rng.integers(st.num_slices(c)))) for c in rng.choice(st.cases, reads)]
    t0 = time.perf_counter()
    for c, z in picks:
        st.slices(c, [z])
    zarr_s = time.perf_counter() - t0
    mem = {c: st.volume(c) for c in st.cases}
    t0 = time.perf_counter()
    for c, z in picks:
        mem[c][0][z].copy(), mem[c][1][z].copy()
    np_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for c in st.cases:
        st.volume(c)
    whole_s = time.perf_counter() - t0
    slices = sum(st.num_slices(c) for c in st.cases)
    return {
        "zarr_random_slices_per_s": reads / zarr_s,
        "numpy_random_slices_per_s": reads / np_s,
        "zarr_whole_case_slices_per_s": slices / whole_s,
    }


def main() -> None:
    from liverseg.data.phantoms import write_phantoms

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 96])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reads", type=int, default=2000)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        write_phantoms(raw, a.cases, seed=1, shape=tuple(a.shape))
        files = sorted(str(f) for f in raw.glob("*.nii.gz"))
        mb = sum(os.path.getsize(f) for f in files) / 1e6
        decode_s = _decode_s(files, a.workers)
        ingest_s = _ingest(Path(tmp), raw, a.cases, a.workers)
        marginal_mb_per_s = (mb - ingest_s["half_mb"]) / (ingest_s["all"] - ingest_s["half"])
        reads = _reads(Path(tmp) / "all.zarr", a.reads)
    print(
        json.dumps(
            {
                "cases": a.cases,
                "shape": a.shape,
                "workers": a.workers,
                "nifti_mb": mb,
                "nibabel_decode_mb_per_s": mb / decode_s,
                "ingest_mb_per_s": mb / ingest_s["all"],
                "ingest_to_decode_ratio": decode_s / ingest_s["all"],
                "ingest_marginal_mb_per_s": marginal_mb_per_s,
                "ingest_marginal_to_decode_ratio": marginal_mb_per_s / (mb / decode_s),
                **reads,
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )


if __name__ == "__main__":
    main()
