"""Load on the REST service from a second process: 500 requests, 10% malformed, 4 concurrent clients."""

import json
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from test_serve import server  # noqa: F401  (fixture)


@pytest.mark.slow
def test_load_500_requests(server, phantom_dir, tmp_path):  # noqa: F811
    base, _ = server
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
    server_proc = next(
        p
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and "serve" in p.info["cmdline"] and base.rsplit(":", 1)[1] in p.info["cmdline"]
    )
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
