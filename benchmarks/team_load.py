"""How far one tracking server carries a team: K simulated Tune trials against the local stack's MLflow
(basic-auth, PostgreSQL), all in one run per configuration.

Each trial creates its run, then every `--epoch-s` seconds (0.5x to 1.5x, at random) logs an epoch's eight
metrics with one log_batch, as rank 0 of a Tune trial does; two UI-like readers meanwhile search the
experiment's runs ordered by val_dice (100 per page) and read a run's metric history, every 2 s. Trials are
threads spread over 4 client processes (plain HTTP with basic auth, as MLflow's client sends it). Per K:
p50/p99 latency of every request, errors (a non-200 answer or no answer within 30 s), and the tracking
server's and PostgreSQL's CPU (percent of one core) and memory, sampled every second.

    PYTHONPATH=platform:tests python benchmarks/team_load.py --trials 8 32 128 --seconds 45 [--workers 2 --pool 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.stack import Stack, new_stack_dir  # noqa: E402

METRICS = ("train_loss", "val_loss", "val_dice", "val_iou", "val_precision", "val_recall", "lr", "train_slices_per_s")
CLIENT_PROCESSES = 4


def _call(session: requests.Session, out: list, kind: str, method: str, url: str, **kw) -> dict | None:
    t = time.perf_counter()
    try:
        r = session.request(method, url, timeout=30, **kw)
        ok = r.status_code == 200
    except requests.RequestException:
        r, ok = None, False
    out.append((kind, time.perf_counter() - t, ok))
    return r.json() if ok and r is not None else None


def _trial(api: str, auth: tuple[str, str], exp: str, until: float, epoch_s: float, out: list) -> None:
    """One Tune trial's tracking: its run, then one log_batch per epoch until `until`."""
    s = requests.Session()
    s.auth = auth
    run = _call(s, out, "create_run", "POST", f"{api}/runs/create", json={"experiment_id": exp})
    if not run:
        return
    run_id, step = run["run"]["info"]["run_id"], 0
    time.sleep(random.uniform(0, epoch_s))  # trials do not start in step
    while time.time() < until:
        now = int(time.time() * 1000)
        metrics = [{"key": k, "value": random.random(), "timestamp": now, "step": step} for k in METRICS]
        _call(s, out, "log_batch", "POST", f"{api}/runs/log-batch", json={"run_id": run_id, "metrics": metrics})
        step += 1
        time.sleep(epoch_s * random.uniform(0.5, 1.5))


def _reader(api: str, auth: tuple[str, str], exp: str, until: float, out: list) -> None:
    """The UI comparing trials: a search ordered by the metric, then one run's history."""
    s = requests.Session()
    s.auth = auth
    while time.time() < until:
        body = {"experiment_ids": [exp], "max_results": 100, "order_by": ["metrics.val_dice DESC"]}
        found = _call(s, out, "search", "POST", f"{api}/runs/search", json=body)
        runs = (found or {}).get("runs", [])
        if runs:
            run_id = random.choice(runs)["info"]["run_id"]
            params = {"run_id": run_id, "metric_key": "val_dice"}
            _call(s, out, "history", "GET", f"{api}/metrics/get-history", params=params)
        time.sleep(2)


def _client_process(args: tuple) -> list:
    api, auth, exp, until, epoch_s, trials = args
    out: list = []
    threads = [threading.Thread(target=_trial, args=(api, auth, exp, until, epoch_s, out)) for _ in range(trials)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _sample(pids: dict[str, int], until: float, samples: dict) -> None:
    """Every second: CPU (percent of one core) and resident memory (MB) of each server's process tree."""
    trees = {name: _tree(pid) for name, pid in pids.items()}
    for procs in trees.values():
        for p in procs:
            p.cpu_percent()
    while time.time() < until:
        time.sleep(1)
        for name, procs in trees.items():
            cpu = rss = 0.0
            for p in procs:
                try:
                    cpu, rss = cpu + p.cpu_percent(), rss + p.memory_info().rss / 2**20
                except psutil.Error:
                    pass
            samples.setdefault(name, []).append((cpu, rss))


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1) if values else float("nan")


def load(stack: Stack, trials: int, seconds: float, epoch_s: float) -> dict:
    """K=`trials` simulated trials and two readers for `seconds`; the figures of that window."""
    env = stack.env
    api, auth = env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow", ("admin", stack.passwords["admin"])
    exp = requests.post(f"{api}/experiments/create", json={"name": f"load-{trials}-{time.time()}"}, auth=auth)
    exp_id = exp.json()["experiment_id"]
    state = json.loads((stack.dir / "state.json").read_text())["procs"]
    until = time.time() + seconds
    samples: dict = {}
    sampler = threading.Thread(
        target=_sample, args=({k: state[k]["pid"] for k in ("mlflow", "postgres")}, until, samples)
    )
    readers_out: list = []
    readers = [threading.Thread(target=_reader, args=(api, auth, exp_id, until, readers_out)) for _ in range(2)]
    sampler.start()
    for r in readers:
        r.start()
    n = min(CLIENT_PROCESSES, trials)
    jobs = [(api, auth, exp_id, until, epoch_s, trials // n + (i < trials % n)) for i in range(n)]
    with mp.get_context("fork").Pool(n) as pool:
        results = [row for part in pool.map(_client_process, jobs) for row in part]
    for t in [*readers, sampler]:
        t.join()
    results += readers_out
    lat = [dt for _, dt, _ in results]
    by_kind = {k: [dt for kind, dt, _ in results if kind == k] for k in ("log_batch", "search", "history")}
    return {
        "trials": trials,
        "requests": len(results),
        "requests_per_s": round(len(results) / seconds, 1),
        "errors": sum(not ok for *_, ok in results),
        "p50_ms": _pct(lat, 0.5),
        "p99_ms": _pct(lat, 0.99),
        **{f"{k}_p50_ms": _pct(v, 0.5) for k, v in by_kind.items()},
        **{f"{k}_p99_ms": _pct(v, 0.99) for k, v in by_kind.items()},
        **{f"{name}_cpu_pct_mean": round(sum(c for c, _ in s) / len(s)) for name, s in samples.items() if s},
        **{f"{name}_rss_mb_max": round(max(r for _, r in s)) for name, s in samples.items() if s},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--seconds", type=float, default=45)
    ap.add_argument("--epoch-s", type=float, default=3.0, help="mean seconds between a trial's epochs")
    ap.add_argument("--workers", type=int, default=0, help="MLflow workers (0: the stack's default)")
    ap.add_argument("--pool", type=int, default=0, help="pooled connections per engine (0: the stack's default)")
    args = ap.parse_args()
    opts = [
        *(["--workers", str(args.workers)] if args.workers else []),
        *(["--pool", str(args.pool)] if args.pool else []),
    ]
    stack = Stack(new_stack_dir())
    try:
        stack.up(*opts)
        config = {"workers": args.workers or "default", "pool": args.pool or "default", "epoch_s": args.epoch_s}
        rows = []
        for k in args.trials:
            rows.append(
                {**config, "load_average": round(os.getloadavg()[0], 1), **load(stack, k, args.seconds, args.epoch_s)}
            )
            print(json.dumps(rows[-1]), flush=True)
        knee = next((r["trials"] for r in rows if r["p99_ms"] > 1000), None)
        log = (stack.dir / "logs" / "mlflow.log").read_text(errors="replace")
        # a request that waited pool_timeout (30 s) for a database connection: the pool, not the CPU, was short
        pool_waits = log.count("QueuePool limit of size")
        print(
            json.dumps(
                {**config, "p99_passes_1s_at_trials": knee or f"> {max(args.trials)}", "pool_timeouts": pool_waits}
            )
        )
    finally:
        stack.down()
        stack.remove()


if __name__ == "__main__":
    main()
