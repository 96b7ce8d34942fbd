"""Alias-to-new-version latency of serving replicas: MLflow webhook vs polling.

A real `mlflow server` (SQLite, webhooks allowed to 127.0.0.1) and two `liverseg serve` replicas of
`models:/liver-unet-prod@champion`: A follows by webhook only (poll_s=0), B polls every --poll-s
seconds without a webhook. The champion alias is moved back and forth --flips times; for each move,
the time from `set_registered_model_alias` returning to GET /model naming the new version (sampled
every 20 ms; the model load is included). Prints one JSON line.

    PYTHONPATH=platform:tests python benchmarks/follow_latency.py --flips 10 --poll-s 2
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.models import constant_state, log_model_run  # noqa: E402
from support.servers import start_mlflow_server, start_serve, stop  # noqa: E402

SECRET = secrets.token_urlsafe(24)  # generated per run: no secret is committed


def _switch_times(bases: list[str], version: str, t0: float, timeout_s: float = 120) -> list[float]:
    """Seconds from t0 until each replica's GET /model names `version` (all sampled in one loop)."""
    seen: dict[str, float] = {}
    while len(seen) < len(bases) and time.time() - t0 < timeout_s:
        for base in bases:
            if base not in seen and httpx.get(base + "/model", timeout=5).json()["version"] == version:
                seen[base] = time.time() - t0
        time.sleep(0.02)
    if len(seen) < len(bases):
        raise RuntimeError(f"{set(bases) - set(seen)} did not switch to v{version}")
    return [seen[b] for b in bases]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flips", type=int, default=10)
    ap.add_argument("--poll-s", type=float, default=2.0)
    args = ap.parse_args()
    import os

    from mlflow.tracking import MlflowClient

    from liverseg.registry.register import register
    from liverseg.serving.webhook import add_webhook

    name = "liver-unet-prod"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true"}
        server = start_mlflow_server(root, env={**env, "MLFLOW_WEBHOOK_CACHE_TTL": "1"})
        os.environ["MLFLOW_TRACKING_URI"] = server.uri
        procs = [server.proc]
        try:
            client = MlflowClient(server.uri)
            cands = [register(run_id=log_model_run(constant_state(bool(v)))[0], name=name) for v in (0, 1)]
            # served versions are copies in `name`, as promote makes them
            versions = [str(client.copy_model_version(f"models:/{c.name}/{c.version}", name).version) for c in cands]
            client.set_registered_model_alias(name, "champion", versions[0])
            model = f"models:/{name}@champion"
            a, base_a = start_serve(root, model, {"LIVERSEG_WEBHOOK_SECRET": SECRET}, "--set", "serve.poll_s=0")
            b, base_b = start_serve(root, model, {}, "--set", f"serve.poll_s={args.poll_s}")
            procs += [a, b]
            add_webhook(base_a + "/webhook", SECRET)
            time.sleep(2)  # the server's webhook cache (1 s here) has seen the new webhook
            lat: dict[str, list[float]] = {"webhook": [], "polling": []}
            for i in range(args.flips):
                target = versions[(i + 1) % 2]
                t0 = time.time()
                client.set_registered_model_alias(name, "champion", target)
                t_a, t_b = _switch_times([base_a, base_b], target, t0)
                lat["webhook"].append(t_a)
                lat["polling"].append(t_b)
        finally:
            for p in procs[::-1]:
                stop(p)
    out = {"bench": "follow_latency", "flips": args.flips, "poll_s": args.poll_s}
    for kind, xs in lat.items():
        out[kind] = {
            "median_s": round(statistics.median(xs), 3),
            "max_s": round(max(xs), 3),
            "min_s": round(min(xs), 3),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
