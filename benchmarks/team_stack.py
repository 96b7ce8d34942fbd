"""The local team stack: start-up time of deploy/local/up.sh (fresh folder, then again on the same data),
and a training epoch's tracking cost against its MLflow server (basic-auth, PostgreSQL) vs SQLite.

An epoch's tracking is what rank 0 does per epoch (liverseg.tracking.logger.MetricLogger: one log_batch
of the epoch's six metrics); a run's one-off setup is create_run plus the config as params (one
log_batch). HTTP requests are counted at requests' transport adapter. Prints one JSON line.

    PYTHONPATH=platform:tests python benchmarks/team_stack.py --epochs 50
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests.adapters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from stack import Stack, new_stack_dir  # noqa: E402

from liverseg.tracking.logger import MetricLogger

METRICS = ("train_loss", "val_loss", "val_dice", "val_iou", "val_precision", "val_recall")
REQUESTS = [0]
_send = requests.adapters.HTTPAdapter.send


def _counting_send(self, *args, **kwargs):
    REQUESTS[0] += 1
    return _send(self, *args, **kwargs)


def _tracking(uri: str, epochs: int) -> dict:
    """Seconds and HTTP requests: one run's setup, then per epoch."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    REQUESTS[0], t0 = 0, time.perf_counter()
    exp = client.get_experiment_by_name("bench") or client.get_experiment(client.create_experiment("bench"))
    run = client.create_run(exp.experiment_id)
    client.log_batch(run.info.run_id, params=[Param(f"cfg.key{i}", str(i)) for i in range(40)])
    setup_s, setup_req = time.perf_counter() - t0, REQUESTS[0]
    logger = MetricLogger(uri, run.info.run_id)
    per_epoch = []
    REQUESTS[0] = 0
    for epoch in range(epochs):
        t = time.perf_counter()
        logger.log({m: 0.5 + epoch * 1e-3 for m in METRICS}, step=epoch)
        per_epoch.append(time.perf_counter() - t)
    return {
        "setup_s": round(setup_s, 4),
        "setup_requests": setup_req,
        "epoch_s_median": round(statistics.median(per_epoch), 5),
        "epoch_s_max": round(max(per_epoch), 5),
        "requests_per_epoch": REQUESTS[0] / epochs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=50)
    args = ap.parse_args()
    requests.adapters.HTTPAdapter.send = _counting_send
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["sqlite"] = _tracking(f"sqlite:///{tmp}/mlflow.db", args.epochs)
    stack = Stack(new_stack_dir())
    try:
        t = time.perf_counter()
        stack.up()
        out["up_fresh_s"] = round(time.perf_counter() - t, 1)
        stack.down()
        t = time.perf_counter()
        env = stack.up()
        out["up_again_s"] = round(time.perf_counter() - t, 1)
        os.environ.update({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": stack.passwords["admin"]})
        out["server"] = _tracking(env["MLFLOW_TRACKING_URI"], args.epochs)
        t = time.perf_counter()
        stack.down()
        out["down_s"] = round(time.perf_counter() - t, 1)
    finally:
        if stack.processes():
            stack.down()
        shutil.rmtree(stack.dir, ignore_errors=True)
    print(json.dumps({"epochs": args.epochs, **out}))


if __name__ == "__main__":
    main()
