"""`liverseg publish` of an update to a real S3 server (moto, in this process): objects written, bytes and
seconds, and what a reader polling the store's URL meanwhile sees (the old store, the new one, or a mix).

A store of --cases phantoms at --size is published, then an update of it (one case re-scanned, one case
added) is published while a reader thread keeps opening `SliceStore(url)` and reading the listing and the
changed case. Run it with the code to measure on PYTHONPATH (before/after). Prints one JSON line.

    PYTHONPATH=platform python benchmarks/publish_update.py --cases 20 --shape 96 96 48 --size 128
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path


def _stores(tmp: Path, cases: int, shape: tuple[int, int, int], size: int) -> tuple[Path, Path]:
    """(old store, update): the update has case 3 re-scanned (another phantom's files) and one case more."""
    from liverseg.core.config import IngestConfig
    from liverseg.data.ingest import ingest
    from liverseg.data.phantoms import write_phantoms

    raw = tmp / "raw"
    write_phantoms(raw, cases + 2, seed=7, shape=shape)
    cfg = IngestConfig(size=(size, size), workers=2)
    old_raw = tmp / "old-raw"
    old_raw.mkdir()
    for n in range(cases):
        for kind in ("volume", "segmentation"):
            shutil.copy(raw / f"{kind}-{n}.nii.gz", old_raw)
    assert ingest(old_raw, tmp / "old.zarr", cfg, progress=False).ok
    shutil.copytree(tmp / "old.zarr", tmp / "new.zarr")
    for kind in ("volume", "segmentation"):  # case 3 re-scanned, case `cases` added
        shutil.copy(raw / f"{kind}-{cases + 1}.nii.gz", old_raw / f"{kind}-3.nii.gz")
        shutil.copy(raw / f"{kind}-{cases}.nii.gz", old_raw)
    assert ingest(old_raw, tmp / "new.zarr", cfg, progress=False).ok
    return tmp / "old.zarr", tmp / "new.zarr"


def _fingerprint(url: str) -> tuple[tuple[str, ...], str] | None:
    """(cases listed, sha256 of case 3's image as read) of what a new reader sees; None if it cannot open."""
    from liverseg.data.store import SliceStore, array_sha256

    try:
        st = SliceStore(url)
        return tuple(st.cases), array_sha256(st.volume("3")[0])
    except Exception:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 48])
    p.add_argument("--size", type=int, default=128)
    a = p.parse_args()
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    os.environ.update(
        AWS_ENDPOINT_URL="http://{}:{}".format(*server.get_host_and_port()),
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import boto3

    from liverseg.data.publish import publish_store

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bench")
    url = "s3://bench/stores/lits.zarr"
    with tempfile.TemporaryDirectory() as tmp:
        old, new = _stores(Path(tmp), a.cases, tuple(a.shape), a.size)
        publish_store(old, url)
        before = _keys(s3)
        want = {"old": _fingerprint(url)}
        seen: list[tuple | None] = []
        done = threading.Event()

        def reader():
            while not done.is_set():
                seen.append(_fingerprint(url))

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        time.sleep(0.5)
        t0 = time.perf_counter()
        publish_store(new, url)
        seconds = time.perf_counter() - t0
        time.sleep(0.5)
        done.set()
        thread.join()
        want["new"] = _fingerprint(url)
        after = _keys(s3)
    server.stop()
    written = {k for k, etag in after.items() if before.get(k) != etag}
    kinds = {"old": 0, "new": 0, "mix": 0, "unreadable": 0}
    for f in seen:
        kinds["unreadable" if f is None else next((k for k, w in want.items() if w == f), "mix")] += 1
    print(
        json.dumps(
            {
                "cases": a.cases,
                "shape": a.shape,
                "size": a.size,
                "objects_before": len(before),
                "objects_written": len(written),
                "seconds": round(seconds, 2),
                "reader_saw": kinds,
            }
        )
    )


def _keys(s3) -> dict[str, str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="bench")
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


if __name__ == "__main__":
    main()
