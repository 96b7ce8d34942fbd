"""Load on the REST service from a second process: 500 requests, 10% malformed, 4 concurrent clients."""

import json
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from liverseg.core.config import ServeSection


@pytest.mark.slow
def test_load_500_requests(server, phantom_dir, tmp_path):  # noqa: F811
    base = server.base
    good = phantom_dir / "volume-1.nii.gz"
    client = textwrap.dedent(f"""
        import json, time, gzip, concurrent.futures as cf
        import httpx, nibabel as nib
        good = open({str(good)!r}, "rb").read()
        bad = [b"", b"not nifti" * 10, good[: len(good) // 2]]
        jobs = [(i % 10 == 0, i) for i in range(500)]
        def one(job):
            malformed, i = job
            body = bad[i % 3] if malformed else good
            t0 = time.perf_counter()
            r = httpx.post({base!r} + "/segment", content=body, timeout=120)
            dt = time.perf_counter() - t0
            shape = list(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).shape) if r.status_code == 200 else None
            return malformed, r.status_code, dt, shape
        deadline = time.time() + 600
        with cf.ThreadPoolExecutor(4) as pool:
            out = [r for r in pool.map(one, jobs) if time.time() < deadline]
        print(json.dumps(out))
    """)
    server_proc = psutil.Process(server.proc.pid)
    proc = subprocess.Popen([sys.executable, "-c", client], stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, server_proc.memory_info().rss)
        time.sleep(0.2)
    results = json.loads(proc.stdout.read())
    assert len(results) == 500
    assert all(400 <= s < 500 for m, s, _, _ in results if m)
    assert all(s == 200 and shape == [64, 64, 24] for m, s, _, shape in results if not m)
    lat = sorted(dt for m, s, dt, _ in results if not m)
    report = {"p50_s": lat[len(lat) // 2], "p95_s": lat[int(len(lat) * 0.95)], "peak_rss_mb": peak / 2**20}
    print("load:", json.dumps(report))
    assert peak < 4 * 2**30  # bounded: a few GB at most for a CPU model


@pytest.fixture
def big_server(mlflow_uri, store_path, tmp_path):
    from support.servers import serve_champion

    yield from serve_champion(store_path, tmp_path, MAX_MB, 120)


MAX_MB = 32
CLIENTS = 24  # three times what serve.max_bodies lets buffer at once


@pytest.mark.slow
def test_concurrent_maximal_uploads_stay_bounded(big_server, tmp_path):  # noqa: F811
    """CLIENTS at once (each from its own loopback address), each a maximal upload (an uncompressed NIfTI
    of random HU just under the limit) and a nested gzip bomb (a small volume's header, then 20x the limit
    of zeros): peak server RSS stays within what the limits allow (at most serve.max_bodies bodies held,
    the rest refused with 503; decoding only in the two model slots, and only as far as a header
    declares), and is printed for the docs. Once every client's body was buffered (300 held-open
    uploads: +1 GB)."""
    import gzip

    import nibabel as nib
    import numpy as np

    base = big_server.base
    limit = MAX_MB * 2**20
    z = (limit - 352) // (512 * 512 * 2)
    vol = np.random.default_rng(0).integers(-1000, 1000, (512, 512, z), dtype=np.int16)
    (tmp_path / "max.nii").write_bytes(nib.Nifti1Image(vol, np.eye(4)).to_bytes())
    small = nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)).to_bytes()
    (tmp_path / "bomb.gz").write_bytes(gzip.compress(gzip.compress(small + bytes(20 * limit))))
    client = textwrap.dedent(f"""
        import json, concurrent.futures as cf, httpx
        bodies = [open({str(tmp_path / "max.nii")!r}, "rb").read(), open({str(tmp_path / "bomb.gz")!r}, "rb").read()]
        def one(i):
            transport = httpx.HTTPTransport(local_address=f"127.0.1.{{i // 2 + 1}}")  # one client per pair
            with httpx.Client(transport=transport, timeout=300) as c:
                return c.post({base!r} + "/segment", content=bodies[i % 2]).status_code
        with cf.ThreadPoolExecutor({CLIENTS}) as pool:
            print(json.dumps(list(pool.map(one, range(2 * {CLIENTS})))))
    """)
    server_proc = psutil.Process(big_server.proc.pid)
    idle = server_proc.memory_info().rss
    proc = subprocess.Popen([sys.executable, "-c", client], stdout=subprocess.PIPE, text=True)
    peak = idle
    while proc.poll() is None:
        peak = max(peak, server_proc.memory_info().rss)
        time.sleep(0.05)
    codes = json.loads(proc.stdout.read())
    uploads, bombs = codes[::2], codes[1::2]  # past the budget of buffered bodies or the queue: 503
    assert set(uploads) <= {200, 503} and set(bombs) <= {413, 503} and 200 in uploads and 413 in bombs, codes
    bodies = ServeSection().max_bodies
    report = {"max_mb": MAX_MB, "clients": CLIENTS, "idle_rss_mb": idle / 2**20, "peak_rss_mb": peak / 2**20}
    report["answers"] = {str(c): codes.count(c) for c in sorted(set(codes))}
    print("uploads:", json.dumps(report))
    # the bodies buffered at once (twice: a growing buffer is reallocated), whatever the number of clients,
    # plus two slots decoding and segmenting (nibabel's copy, canonical copy, float32 probabilities at full
    # size, mask, reply: ~12 bodies' worth each); six bombs decoded outside the slots would need 6 x 20 x it
    assert peak - idle < (2 * bodies + 2 * 12) * limit
