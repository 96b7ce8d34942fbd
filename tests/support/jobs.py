"""Submitted jobs on a running team stack, as its users see them: `liverseg ... --submit`, `liverseg jobs`,
and what the cluster holds (Ray's own view, read by a short driver of our own)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from support.cli import run_liverseg

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def submit(stack, user: str, command: str, store: str, sets: list[str], cwd: Path) -> tuple[str, str, float]:
    """`liverseg COMMAND --submit` as `user` from `cwd`; (job id, its output, seconds it took)."""
    t0 = time.monotonic()
    args = [command, "--submit", "--store", store, *[x for s in sets for x in ("--set", s)]]
    res = run_liverseg(args, stack.env_for(user), cwd=cwd, timeout_s=300)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    return re.search(r"submitted \w+ job (\S+) as ", res.stdout).group(1), res.stdout + res.stderr, took


def jobs(stack, user: str, everyone: bool = True) -> list[dict]:
    res = run_liverseg(["jobs", "--json", *(["--all"] if everyone else [])], stack.env_for(user), timeout_s=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def wait_for(stack, user: str, done: Callable[[dict[str, dict]], bool], timeout_s: float, every_s: float = 3.0):
    """Poll `liverseg jobs --all --json` as `user` until `done(jobs by id)`; every sample, by id."""
    samples = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = {j["id"]: j for j in jobs(stack, user)}
        samples.append(now)
        if done(now):
            return samples
        time.sleep(every_s)
    raise AssertionError(f"jobs not done within {timeout_s} s: {json.dumps(samples[-1], indent=1)[-3000:]}")


def logs(stack, user: str, job_id: str, verbose: bool = False) -> str:
    res = run_liverseg(["jobs", "logs", job_id, *(["-v"] if verbose else [])], stack.env_for(user), timeout_s=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def wait_for_line(stack, user: str, job_id: str, pattern: str, timeout_s: float) -> float:
    """Seconds until the job's progress lines hold `pattern` (a regex)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if re.search(pattern, logs(stack, user, job_id), re.M):
            return time.monotonic() - t0
        time.sleep(1.0)
    raise AssertionError(
        f"{job_id}: no line matching {pattern!r} in {timeout_s} s:\n{logs(stack, user, job_id)[-3000:]}"
    )


_CLUSTER = """
import json, ray
from ray.util.state import list_actors, list_placement_groups
ray.init(logging_level="ERROR", log_to_driver=False)
total, free = ray.cluster_resources(), ray.available_resources()
pgs = [{"id": p.placement_group_id, "job": p.creator_job_id, "state": p.state, "bundles": p.bundles}
       for p in list_placement_groups(limit=10000, detail=True)]
actors = [{"job": a.job_id, "pid": a.pid, "state": a.state, "name": a.class_name}
          for a in list_actors(limit=10000, filters=[("state", "=", "ALIVE")], detail=True)]
jobs = {j.submission_id: j.job_id for j in ray.util.state.list_jobs(limit=10000) if j.submission_id}
print("CLUSTER " + json.dumps({"cpu": total.get("CPU", 0), "cpu_free": free.get("CPU", 0), "pgs": pgs,
                              "actors": actors, "jobs": jobs}))
"""


def ray_jobs(stack, job_id: str = "") -> object:
    """Ray's own job info (the Jobs REST API, with the stack's token): one job, or the list of all."""
    import requests

    token = (stack.dir / "ray-token").read_text().strip()
    res = requests.get(
        f"{stack.env['RAY_DASHBOARD_ADDRESS']}/api/jobs/{job_id}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    res.raise_for_status()
    return res.json()


def cluster(stack) -> dict:
    """What Ray holds now: CPUs (total, free), placement groups, live actors (with PIDs), Ray job ids."""
    res = subprocess.run(
        [sys.executable, "-c", _CLUSTER], env=stack.env_for("admin"), capture_output=True, text=True, timeout=120
    )
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("CLUSTER ")), None)
    assert line, res.stderr[-3000:]
    return json.loads(line.removeprefix("CLUSTER "))


def holdings(state: dict, submission_id: str) -> dict:
    """What one submitted job holds in `state`: CPUs in its live placement groups, their count, its live
    actors' PIDs."""
    job = state["jobs"].get(submission_id)
    pgs = [p for p in state["pgs"] if p["job"] == job and p["state"] in ("CREATED", "PENDING", "RESCHEDULING")]
    cpus = sum(b.get("unit_resources", b).get("CPU", 0) for p in pgs for b in p["bundles"])
    return {
        "cpus": cpus,
        "placement_groups": len(pgs),
        "pids": sorted(a["pid"] for a in state["actors"] if a["job"] == job),
    }


def files_holding(roots: list[Path], secrets: dict[str, str]) -> list[str]:
    """'path: what' for every file under `roots` that holds one of the secret values."""
    found = []
    for root in roots:
        for f in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            data = f.read_bytes()
            found += [f"{f}: {name}" for name, value in secrets.items() if value.encode() in data]
    return found
