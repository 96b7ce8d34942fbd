"""The local team stack in one run: start-up of deploy/local/stack.py (fresh folder, then again on the same
data), the tracking server's processes and memory, and a training epoch's tracking cost against it
(basic-auth, PostgreSQL) as a ratio to SQLite.

An epoch's tracking is what rank 0 does per epoch (liverseg.tracking.logger.MetricLogger): `log` queues
the epoch's eight metrics (the hot path: what the epoch waits for), a background thread writes them with
one log_batch; `flush` waits for that write, so log + flush is the write's cost. A run's one-off setup is
create_run plus the config as params (one log_batch). HTTP requests are counted at requests' adapter.
Prints one JSON line.

    PYTHONPATH=platform:tests python benchmarks/team_stack.py --epochs 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests.adapters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from liverseg.tracking.logger import MetricLogger  # noqa: E402
from support.stack import Stack, new_stack_dir  # noqa: E402

METRICS = ("train_loss", "val_loss", "val_dice", "val_iou", "val_precision", "val_recall", "lr", "train_slices_per_s")
REQUESTS = [0]
_send = requests.adapters.HTTPAdapter.send


def _counting_send(self, *args, **kwargs):
    REQUESTS[0] += 1
    return _send(self, *args, **kwargs)


def _ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 2)


def _tracking(uri: str, epochs: int) -> dict:
    """Milliseconds and HTTP requests: one run's setup, then per epoch (hot path; the write)."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    REQUESTS[0], t0 = 0, time.perf_counter()
    exp = client.get_experiment_by_name("bench") or client.get_experiment(client.create_experiment("bench"))
    run = client.create_run(exp.experiment_id)
    client.log_batch(run.info.run_id, params=[Param(f"cfg.key{i}", str(i)) for i in range(40)])
    setup_s, setup_req = time.perf_counter() - t0, REQUESTS[0]
    logger = MetricLogger(uri, run.info.run_id)
    hot, write = [], []
    REQUESTS[0] = 0
    for epoch in range(epochs):
        t = time.perf_counter()
        logger.log({m: 0.5 + epoch * 1e-3 for m in METRICS}, step=epoch)
        hot.append(time.perf_counter() - t)
        logger.flush()
        write.append(time.perf_counter() - t)
    return {
        "setup_s": round(setup_s, 3),
        "setup_requests": setup_req,
        "epoch_hot_path_ms_median": _ms(hot),
        "epoch_write_ms_median": _ms(write),
        "epoch_write_ms_max": round(max(write) * 1000, 2),
        "requests_per_epoch": REQUESTS[0] / epochs,
    }


def _footprint(stack: Stack) -> dict:
    """Processes and resident memory (MB) of the tracking server's tree, and of the whole stack."""
    state = json.loads((stack.dir / "state.json").read_text())
    root = psutil.Process(state["procs"]["mlflow"]["pid"])
    tree = [root, *root.children(recursive=True)]
    everything = [psutil.Process(pid) for pid in stack.processes()]
    return {
        "mlflow_processes": len(tree),
        "mlflow_rss_mb": round(sum(p.memory_info().rss for p in tree) / 2**20),
        "mlflow_uss_mb": round(sum(p.memory_full_info().uss for p in tree) / 2**20),
        "stack_processes": len(everything),
        "stack_rss_mb": round(sum(p.memory_info().rss for p in everything) / 2**20),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--workers", type=int, default=0, help="MLflow workers (0: the stack's default)")
    args = ap.parse_args()
    requests.adapters.HTTPAdapter.send = _counting_send
    out: dict = {"load_average_at_start": [round(x, 1) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        out["sqlite"] = _tracking(f"sqlite:///{tmp}/mlflow.db", args.epochs)
    stack, opts = Stack(new_stack_dir(closed=False)), (["--workers", str(args.workers)] if args.workers else [])
    try:
        t = time.perf_counter()
        stack.up(*opts)
        out["up_fresh_s"] = round(time.perf_counter() - t, 1)
        out["up_fresh_ready_s"] = json.loads((stack.dir / "state.json").read_text())["ready_s"]
        t = time.perf_counter()
        stack.down()
        out["down_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        env = stack.up(*opts)
        out["up_again_s"] = round(time.perf_counter() - t, 1)
        out["up_again_ready_s"] = json.loads((stack.dir / "state.json").read_text())["ready_s"]
        out.update(_footprint(stack))
        os.environ.update({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": stack.passwords["admin"]})
        out["server"] = _tracking(env["MLFLOW_TRACKING_URI"], args.epochs)
        out["epoch_write_ratio_to_sqlite"] = round(
            out["server"]["epoch_write_ms_median"] / out["sqlite"]["epoch_write_ms_median"], 2
        )
        out["after_epochs"] = _footprint(stack)
    finally:
        if stack.processes():
            stack.down()
        stack.remove()
    print(json.dumps({"epochs": args.epochs, **out}))


if __name__ == "__main__":
    main()
