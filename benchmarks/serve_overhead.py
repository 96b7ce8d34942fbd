"""What serving in production costs a replica, each ratio measured in one run on one machine:

  shadow   p50/p95 latency of the champion's answers from a replica with a (slower) shadow and from one
           without, in alternating phases (the shadow's queue drained before each phase without it)
  request  per-request cost of the request id, metrics and JSON access log (`serving.access`): the same
           FastAPI app called in-process through ASGI, with and without them; and one /metrics render
  trickle  8 sockets declaring 512 MiB and sending a byte every 0.5 s beside normal uploads: what the
           normal ones got, and when the trickles were cut (`--server-path` runs the replica from another
           checkout, e.g. /work/main/platform, for the numbers before)
  memory   peak RSS of a replica answering the largest upload it allows (512x512x1023 int16, uncompressed,
           512 MiB) and the largest decoded volume (the same voxels as float32, gzipped: 1 GiB decoded)

Prints one JSON line per part (append them to benchmarks/results/serve-overhead-cpu.jsonl):

    PYTHONPATH=platform:tests python benchmarks/serve_overhead.py --parts shadow,request,trickle,memory
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.models import constant_state, log_model_run  # noqa: E402
from support.paths import REAL_CT  # noqa: E402
from support.prom import scrape, value  # noqa: E402
from support.servers import start_serve, stop  # noqa: E402
from support.traffic import Trickler  # noqa: E402

CHAMPION = "models:/liver-unet@champion"


def _pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(xs, q)), 4)


def _registry(root: Path) -> None:
    """liver-unet@champion: a no-liver U-Net at 64x64; liver-unet-candidates@challenger: the same network
    at 160x160 input (6x the pixels per slice: a slower shadow)."""
    from mlflow.tracking import MlflowClient

    from liverseg.registry.register import register

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient()
    champ = register(run_id=log_model_run(constant_state(liver=False))[0])
    served = client.copy_model_version(f"models:/{champ.name}/{champ.version}", "liver-unet")
    client.set_registered_model_alias("liver-unet", "champion", served.version)
    register(run_id=log_model_run(constant_state(liver=False), size=(160, 160))[0])  # @challenger


def _drain(base: str, timeout_s: float = 300) -> None:
    """Until the shadow compared everything it queued."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        s = scrape(base)
        if value(s, "liverseg_shadow_requests_total", outcome="compared") >= value(
            s, "liverseg_shadow_requests_total", outcome="queued"
        ):
            return
        time.sleep(0.2)


def shadow_part(root: Path, rounds: int, per_phase: int, think_s: float) -> dict:
    body = (REAL_CT / "volume-0.nii.gz").read_bytes()
    plain, base_a = start_serve(root, CHAMPION, {})
    shadowed, base_b = start_serve(root, CHAMPION, {}, "--shadow", "models:/liver-unet-candidates@challenger")
    lat: dict[str, list[float]] = {"without": [], "with": []}
    try:
        for base in (base_a, base_b):  # warm-up: first requests pay for lazy imports
            for _ in range(3):
                httpx.post(base + "/segment", content=body, timeout=300)
        for _ in range(rounds):
            for kind, base in (("without", base_a), ("with", base_b)):
                _drain(base_b)
                for _ in range(per_phase):
                    t0 = time.perf_counter()
                    r = httpx.post(base + "/segment", content=body, timeout=300)
                    lat[kind].append(time.perf_counter() - t0)
                    assert r.status_code == 200 and r.headers["x-model-version"] == "1"
                    time.sleep(think_s)
        _drain(base_b)
        s = scrape(base_b)
        shadow_s = value(s, "liverseg_shadow_seconds_sum") / max(1.0, value(s, "liverseg_shadow_seconds_count"))
        outcomes = {o: value(s, "liverseg_shadow_requests_total", outcome=o) for o in ("compared", "queue_full")}
    finally:
        stop(plain)
        stop(shadowed)
    out = {"part": "shadow", "rounds": rounds, "per_phase": per_phase, "think_s": think_s, "shadow": outcomes}
    for kind, xs in lat.items():
        out[kind] = {"p50_s": _pct(xs, 50), "p95_s": _pct(xs, 95), "n": len(xs)}
    out["p50_ratio"] = round(out["with"]["p50_s"] / out["without"]["p50_s"], 3)
    out["p95_ratio"] = round(out["with"]["p95_s"] / out["without"]["p95_s"], 3)
    out["shadow_mean_s"] = round(shadow_s, 4)
    return out


def request_part(calls: int, rounds: int = 5) -> dict:
    """In-process: a trivial GET answered by the same FastAPI app bare, with metrics and request ids only,
    and with the JSON access log too (to /dev/null); microseconds per request, alternating rounds."""
    from fastapi import FastAPI

    from liverseg.serving.access import Access
    from liverseg.serving.metrics import Metrics

    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "version": "1"}

    sink = open(os.devnull, "w")  # noqa: SIM115
    variants = {
        "bare": app,
        "metrics": Access(app, Metrics(), log=False),
        "metrics+log": Access(app, Metrics(), True, sink),
    }
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/health",
        "headers": [],
        "query_string": b"",
        "client": ("127.0.0.1", 1),
    }
    scope |= {"server": ("127.0.0.1", 8080), "scheme": "http", "http_version": "1.1", "root_path": ""}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    async def run(asgi, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await asgi(dict(scope), receive, send)
        return time.perf_counter() - t0

    per: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, asgi in variants.items():
            per[name].append(asyncio.run(run(asgi, calls)) / calls * 1e6)
    us = {k: round(statistics.median(v), 1) for k, v in per.items()}
    metrics = variants["metrics+log"].metrics
    t0 = time.perf_counter()
    for _ in range(100):
        body, _ = metrics.render()
    return {
        "part": "request",
        "calls_per_round": calls,
        "rounds": rounds,
        "us_per_request": us,
        "overhead_us": {
            "metrics": round(us["metrics"] - us["bare"], 1),
            "metrics+log": round(us["metrics+log"] - us["bare"], 1),
        },
        "metrics_render_ms": round((time.perf_counter() - t0) * 10, 2),
        "metrics_bytes": len(body),
    }


def trickle_part(root: Path, server_path: str | None, seconds: float) -> dict:
    """8 trickling sockets (declaring 512 MiB, a byte every 0.5 s) beside normal uploads from the same host."""
    body = (REAL_CT / "volume-0.nii.gz").read_bytes()
    env = {"PYTHONPATH": server_path} if server_path else {}
    proc, base = start_serve(root, CHAMPION, env)
    try:
        alone = [_timed_post(base, body) for _ in range(5)]
        tricklers = [Trickler(base, "127.0.0.1", 512 << 20, 0.5) for _ in range(8)]
        for t in tricklers:
            t.start()
        time.sleep(1)
        beside, t0 = [], time.time()
        while time.time() - t0 < seconds:
            beside.append(_timed_post(base, body))
        for t in tricklers:
            t.join(5)
    finally:
        stop(proc)
    codes = [c for c, _ in beside]
    ok = [s for c, s in beside if c == 200]
    return {
        "part": "trickle",
        "server": server_path or "this checkout",
        "alone_p50_s": _pct([s for _, s in alone], 50),
        "beside": {
            "answers": {str(c): codes.count(c) for c in sorted(set(codes))},
            "p50_s": _pct(ok, 50) if ok else None,
        },
        "tricklers": [
            {"status": t.status, "seconds": round(t.seconds, 1), "bytes_sent": t.sent, "error": t.error}
            for t in tricklers
        ],
    }


def _timed_post(base: str, body: bytes) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = httpx.post(base + "/segment", content=body, timeout=300)
    return r.status_code, round(time.perf_counter() - t0, 4)


def memory_part(root: Path) -> dict:
    """Peak RSS of a replica (default limits) answering the largest upload and the largest decoded volume."""
    import nibabel as nib
    import psutil

    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1000, (512, 512, 1023), dtype=np.int16)
    int16 = nib.Nifti1Image(vol, np.diag([0.7, 0.7, 1.0, 1.0])).to_bytes()
    del vol
    f32 = gzip.compress(nib.Nifti1Image(np.full((512, 512, 1023), 40.0, np.float32), np.eye(4)).to_bytes(), 1)
    proc, base = start_serve(root, CHAMPION, {})
    out = {"part": "memory", "cases": []}
    try:
        httpx.post(base + "/segment", content=(REAL_CT / "volume-0.nii.gz").read_bytes(), timeout=300)  # warm
        server = psutil.Process(proc.pid)
        for name, body in (
            ("int16 512x512x1023 .nii (512 MiB upload)", int16),
            ("float32 512x512x1023 .nii.gz (1 GiB decoded)", f32),
        ):
            idle, peak, done = server.memory_info().rss, [0], threading.Event()

            def sample(peak=peak, done=done) -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], server.memory_info().rss)
                    time.sleep(0.02)

            watcher = threading.Thread(target=sample, daemon=True)
            watcher.start()
            status, seconds = _timed_post(base, body)
            done.set()
            watcher.join()
            out["cases"].append(
                {
                    "case": name,
                    "upload_mb": round(len(body) / 2**20, 1),
                    "status": status,
                    "seconds": seconds,
                    "idle_rss_mb": round(idle / 2**20),
                    "peak_rss_mb": round(peak[0] / 2**20),
                    "growth_mb": round((peak[0] - idle) / 2**20),
                }
            )
    finally:
        stop(proc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="shadow,request,trickle,memory")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-phase", type=int, default=10)
    ap.add_argument("--think-s", type=float, default=0.5, help="pause between a client's requests")
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--trickle-s", type=float, default=15.0)
    ap.add_argument("--server-path", default=None, help="PYTHONPATH of the replica in the trickle part")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)
        if set(parts) & {"shadow", "trickle", "memory"}:
            _registry(root)
        for part in parts:
            if part == "shadow":
                out = shadow_part(root, args.rounds, args.per_phase, args.think_s)
            elif part == "request":
                out = request_part(args.calls)
            elif part == "trickle":
                out = trickle_part(root, args.server_path, args.trickle_s)
            else:
                out = memory_part(root)
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
