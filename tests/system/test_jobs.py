"""A team launching tuning jobs on the local stack (deploy/local/up.sh): real PostgreSQL, S3, MLflow with
basic-auth and a two-node Ray cluster (2 CPUs each). alice and bob submit searches at once (`tune
--submit`), watch them with `liverseg jobs`, bob's try to stop alice's search is refused; alice's long
search fills the cluster, so bob's training waits (PENDING) until she stops it; she resumes it, its driver
dies, she resumes it again; a local `liverseg train` beside the cluster finishes. One scenario, run once
(module fixture); one test per fact. The numbers of the closing note are printed (`-s`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from support.cli import cli_cmd, run_liverseg
from support.jobs import (
    TERMINAL,
    cluster,
    files_holding,
    holdings,
    jobs,
    logs,
    ray_jobs,
    submit,
    wait_for,
    wait_for_line,
)
from support.models import TINY
from support.stack import add_team

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]
SEARCH = [*TINY, "train.steps_per_epoch=2", "train.epochs=2", "tune.search=grid", "tune.num_samples=1"]
SPACE = "space={train.lr: {grid: [0.003, 1.0e-9]}}"  # two trials; ASHA stops the one that cannot learn
LONG = [  # two trials that both learn and are never pruned: they hold 3 of the cluster's 4 CPUs for minutes
    *TINY,
    "train.steps_per_epoch=2",
    "train.epochs=8",
    "tune.search=grid",
    "tune.num_samples=1",
    "tune.scheduler=none",
    "space={train.lr: {grid: [0.003, 0.002]}}",
]


@dataclass
class Day:
    """What the scenario saw; each test checks one fact of it."""

    stack: object
    store: str  # the slice store in the bucket
    store_path: str  # the same on this machine (the local train's)
    ids: dict[str, str] = field(default_factory=dict)  # alice, bob, long, long2, long3, train -> job id
    outputs: dict[str, str] = field(default_factory=dict)  # what each command printed
    samples: list[dict] = field(default_factory=list)  # `jobs --all --json` while the searches ran
    numbers: dict[str, float] = field(default_factory=dict)
    held: dict[str, dict] = field(default_factory=dict)  # the long search's holdings, before and after stop
    checkout: dict[str, bytes] = field(default_factory=dict)  # alice's folder before submitting
    local_train: subprocess.CompletedProcess | None = None


def _sets(user: str, name: str, extra: list[str], bucket: str) -> list[str]:
    return [*extra, f"run.experiment={user}-jobs", f"tune.name={name}", f"run.storage_path={bucket}/ray"]


def _searches(day: Day, tmp: Path) -> None:
    """alice and bob submit at once; bob's cap (1 trial at a time) holds his second trial back."""
    bucket = day.stack.env["LIVERSEG_BUCKET_URL"]
    subs = {
        "alice": _sets("alice", "alice-search", [*SEARCH, SPACE, "tune.max_concurrent=2"], bucket),
        "bob": _sets(
            "bob", "bob-search", [*SEARCH, SPACE, "tune.max_concurrent=2", "team.max_trials_per_user=1"], bucket
        ),
    }
    procs = {}
    for user, sets in subs.items():
        args = ["tune", "--submit", "--store", day.store, *[x for s in sets for x in ("--set", s)]]
        procs[user] = subprocess.Popen(
            [sys.executable, "-m", "liverseg.cli", *args],
            env=day.stack.env_for(user),
            cwd=tmp / user,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    t0 = time.monotonic()
    for user, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + err[-3000:]
        day.outputs[f"submit-{user}"] = out + err
        day.ids[user] = out.split("submitted tune job ")[1].split()[0]
    day.numbers["submit_s (both at once)"] = round(time.monotonic() - t0, 1)
    day.numbers["submit_to_first_epoch_s"] = round(
        time.monotonic() - t0 + wait_for_line(day.stack, "alice", day.ids["alice"], r"epoch 1/2", 600), 1
    )
    refused = run_liverseg(["jobs", "stop", day.ids["alice"]], day.stack.env_for("bob"))
    day.outputs["bob-stops-alice"] = f"{refused.returncode}\n{refused.stdout}{refused.stderr}"
    mine = run_liverseg(["jobs", "--json"], day.stack.env_for("bob"))
    day.outputs["bob-jobs"] = mine.stdout
    day.samples = wait_for(
        day.stack, "bob", lambda js: all(js[day.ids[u]]["status"] in TERMINAL for u in ("alice", "bob")), 1200
    )


def _stop_and_wait(day: Day, tmp: Path) -> None:
    """alice's long search fills the cluster (2 trials x 1.5 CPUs of 4): bob's training waits, PENDING;
    alice stops her search: what it held is released, and bob's training starts and finishes."""
    bucket = day.stack.env["LIVERSEG_BUCKET_URL"]
    long = _sets("alice", "alice-long", [*LONG, "tune.max_concurrent=2", "scaling.cpus_per_worker=1.5"], bucket)
    day.ids["long"], day.outputs["submit-long"], _ = submit(day.stack, "alice", "tune", day.store, long, tmp / "alice")
    wait_for_line(day.stack, "alice", day.ids["long"], r"epoch 1/8", 600)
    train = [
        *TINY,
        "train.steps_per_epoch=2",
        "train.epochs=2",
        "run.experiment=bob-jobs",
        f"run.storage_path={bucket}/ray",
    ]
    day.ids["train"], day.outputs["submit-train"], _ = submit(day.stack, "bob", "train", day.store, train, tmp / "bob")
    pending = wait_for(day.stack, "bob", lambda js: js[day.ids["train"]]["status"] == "PENDING", 180)
    day.outputs["train-pending"] = json.dumps(pending[-1][day.ids["train"]])
    before = cluster(day.stack)
    t0 = time.monotonic()
    stop = run_liverseg(["jobs", "stop", day.ids["long"]], day.stack.env_for("alice"), timeout_s=300)
    day.outputs["alice-stops-long"] = f"{stop.returncode}\n{stop.stdout}{stop.stderr}"
    day.numbers["stop_s (to STOPPED)"] = round(time.monotonic() - t0, 1)
    after = holdings(cluster(day.stack), day.ids["long"])
    while (after["placement_groups"] or after["pids"]) and time.monotonic() - t0 < 120:
        time.sleep(1)
        after = holdings(cluster(day.stack), day.ids["long"])
    day.numbers["stop_released_s"] = round(time.monotonic() - t0, 1)
    day.held = {"before": holdings(before, day.ids["long"]), "after": after}
    day.held["pids_alive_after"] = [p for p in day.held["before"]["pids"] if _alive(p)]
    wait_for(day.stack, "bob", lambda js: js[day.ids["train"]]["status"] in TERMINAL, 900)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _resume_twice(day: Day, tmp: Path) -> None:
    """alice resumes the stopped search; its driver is killed (a lost head's driver); `jobs` says it can be
    resumed; she resumes it again, and it finishes."""
    res = run_liverseg(["jobs", "resume", day.ids["long"]], day.stack.env_for("alice"))
    assert res.returncode == 0, res.stderr[-3000:]
    day.ids["long2"] = res.stdout.split(" as ")[1].split(":")[0]
    wait_for_line(day.stack, "alice", day.ids["long2"], r"epoch \d+/8", 600)
    pid = ray_jobs(day.stack, day.ids["long2"])["driver_info"]["pid"]
    os.kill(int(pid), signal.SIGKILL)
    lost = wait_for(day.stack, "alice", lambda js: js[day.ids["long2"]]["status"] == "FAILED", 120)
    day.outputs["lost-listing"] = run_liverseg(["jobs"], day.stack.env_for("alice")).stdout
    day.outputs["lost-json"] = json.dumps(lost[-1][day.ids["long2"]])
    res = run_liverseg(["jobs", "resume", day.ids["long2"]], day.stack.env_for("alice"))
    assert res.returncode == 0, res.stderr[-3000:]
    day.ids["long3"] = res.stdout.split(" as ")[1].split(":")[0]
    wait_for(day.stack, "alice", lambda js: js[day.ids["long3"]]["status"] in TERMINAL, 900)


def _listing_time(day: Day, tmp: Path) -> None:
    """Ten jobs on the cluster (bob submits a few more and stops each at once), then `jobs --all` timed."""
    bucket = day.stack.env["LIVERSEG_BUCKET_URL"]
    train = [*TINY, "train.epochs=1", "run.experiment=bob-jobs", f"run.storage_path={bucket}/ray"]
    while len(jobs(day.stack, "admin")) < 10:
        job, _, _ = submit(day.stack, "bob", "train", day.store, [*train, f"train.seed={time.time_ns()}"], tmp / "bob")
        stop = run_liverseg(["jobs", "stop", job], day.stack.env_for("bob"), timeout_s=300)
        assert stop.returncode == 0 and "STOPPED" in stop.stdout, stop.stdout + stop.stderr
    took = []
    for _ in range(3):
        t0 = time.monotonic()
        listed = jobs(day.stack, "admin")
        took.append(time.monotonic() - t0)
    day.numbers[f"jobs_listing_s ({len(listed)} jobs, median of 3, CLI start included)"] = round(sorted(took)[1], 2)


def _local_train_beside(day: Day, tmp: Path) -> None:
    """A local `liverseg train` (its own Ray, SQLite) while the stack's cluster runs on the machine."""
    env = {k: v for k, v in day.stack.env_for("alice").items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'local.db'}"
    cmd = cli_cmd(
        "train", day.store_path, *TINY, "train.epochs=2", "train.steps_per_epoch=2", f"run.storage_path={tmp / 'ray'}"
    )
    t0 = time.monotonic()
    day.local_train = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    day.numbers["local_train_beside_cluster_s"] = round(time.monotonic() - t0, 1)


@pytest.fixture(scope="module")
def day(team_stack, store_path, tmp_path_factory):
    stack = team_stack
    tmp = tmp_path_factory.mktemp("jobs")
    add_team(stack)
    store = f"{stack.env['LIVERSEG_BUCKET_URL']}/stores/slices.zarr"
    assert run_liverseg(["publish", "--store", store_path, "--to", store], stack.env_for("alice")).returncode == 0
    for user in ("alice", "bob"):
        (tmp / user).mkdir()
    (tmp / "alice" / "tune-results.json").write_text('{"a DVC output": true}')
    day = Day(stack, store, store_path, checkout={p.name: p.read_bytes() for p in (tmp / "alice").iterdir()})
    for phase in (_searches, _stop_and_wait, _resume_twice, _listing_time, _local_train_beside):
        t0 = time.monotonic()
        phase(day, tmp)
        print(
            f"\n{phase.__name__}: {time.monotonic() - t0:.0f} s; numbers so far {json.dumps(day.numbers)}", flush=True
        )
    for user in ("alice", "bob", "admin"):
        day.outputs[f"jobs-json-{user}"] = json.dumps(jobs(stack, user))
    for name, job in day.ids.items():
        day.outputs[f"logs-{name}"] = logs(stack, "admin", job, verbose=True)
    day.checkout = {**day.checkout, "after": {p.name: p.read_bytes() for p in (tmp / "alice").iterdir()}}
    print("\nclosing-note numbers:", json.dumps({**day.numbers, "stop released": day.held}, indent=1))
    return day


def _client(day: Day, monkeypatch, user: str = "admin") -> MlflowClient:
    """An MLflow client as `user` (MLflow reads the login from the environment: this test's only)."""
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(k, day.stack.env_for(user)[k])
    return MlflowClient(day.stack.env["MLFLOW_TRACKING_URI"])


def test_both_searches_are_listed_with_their_owners(day):
    seen = {j["id"]: j["owner"] for sample in day.samples for j in sample.values()}
    assert seen[day.ids["alice"]] == "alice" and seen[day.ids["bob"]] == "bob"
    mine = json.loads(day.outputs["bob-jobs"])  # without --all: bob's own
    assert {j["owner"] for j in mine} == {"bob"} and day.ids["bob"] in {j["id"] for j in mine}
    listed = day.samples[0][day.ids["alice"]]
    assert {"id", "owner", "kind", "status", "experiment", "mlflow_run_id", "submitted_at"} <= listed.keys()
    assert listed["kind"] == "tune" and listed["experiment"] == "alice-jobs"


def test_both_searches_succeed_with_runs_by_their_owners(day, monkeypatch):
    last = day.samples[-1]
    assert last[day.ids["alice"]]["status"] == last[day.ids["bob"]]["status"] == "SUCCEEDED"
    client = _client(day, monkeypatch)
    for user in ("alice", "bob"):
        job = last[day.ids[user]]
        parent = client.get_run(job["mlflow_run_id"])
        assert parent.info.status == "FINISHED" and parent.data.tags["liverseg.job.owner"] == user
        kids = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        assert len(kids) == 2 and {r.data.tags["mlflow.user"] for r in [parent, *kids]} == {user}
        assert job["trials_done"] == 2 and job["best_val_dice"] is not None
        assert "tune-results.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_the_per_user_cap_holds_trials_back(day):
    bob = [s[day.ids["bob"]] for s in day.samples if day.ids["bob"] in s]
    assert max(j["trials_running"] for j in bob) <= 1  # team.max_trials_per_user=1
    assert any("bob runs 1 of 1 trials" in j["waiting_for"] for j in bob), bob[-3:]


def test_a_stranger_cannot_stop_a_job(day):
    code, *text = day.outputs["bob-stops-alice"].split("\n")
    assert code == "1" and f"refused: bob may not stop job {day.ids['alice']}: it belongs to alice" in "\n".join(text)


def test_a_job_waits_while_the_cluster_is_full(day, monkeypatch):
    pending = json.loads(day.outputs["train-pending"])
    assert pending["status"] == "PENDING" and "cluster full" in pending["waiting_for"], pending
    final = json.loads(day.outputs["jobs-json-bob"])
    train = next(j for j in final if j["id"] == day.ids["train"])
    assert (
        train["status"] == "SUCCEEDED"
        and _client(day, monkeypatch).get_run(train["mlflow_run_id"]).info.status == "FINISHED"
    )


def test_a_stopped_search_leaves_no_running_run_and_releases_the_cluster(day, monkeypatch):
    assert day.outputs["alice-stops-long"].startswith("0\n") and "STOPPED" in day.outputs["alice-stops-long"]
    assert day.held["before"]["cpus"] >= 3 and day.held["before"]["pids"]
    assert day.held["after"] == {"cpus": 0, "placement_groups": 0, "pids": []} and day.held["pids_alive_after"] == []
    client = _client(day, monkeypatch)
    exp = client.get_experiment_by_name("alice-jobs").experiment_id
    assert client.search_runs([exp], filter_string="attributes.status = 'RUNNING'") == []


def test_a_lost_driver_is_resumable_and_resumes(day, monkeypatch):
    lost = json.loads(day.outputs["lost-json"])
    assert lost["status"] == "FAILED" and lost["resumable"], lost
    assert f"liverseg jobs resume {day.ids['long2']}" in day.outputs["lost-listing"]
    final = {j["id"]: j for j in json.loads(day.outputs["jobs-json-alice"])}
    assert final[day.ids["long3"]]["status"] == "SUCCEEDED"
    client = _client(day, monkeypatch)
    parent = final[day.ids["long3"]]["mlflow_run_id"]
    assert parent == final[day.ids["long"]]["mlflow_run_id"]  # one search, three jobs
    kids = client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    keys = [r.data.tags["liverseg.run_key"] for r in kids]
    assert len(keys) == len(set(keys)) == 2 and {r.info.status for r in kids} == {"FINISHED"}


def test_no_secret_in_any_log_listing_or_job_info(day):
    stack = day.stack
    secrets = {
        "alice's password": stack.passwords["alice"],
        "bob's password": stack.passwords["bob"],
        "the S3 secret key": stack.env["AWS_SECRET_ACCESS_KEY"],
    }
    info = ray_jobs(stack)  # what `ray job list` shows anyone with the token: runtime_env, metadata, entrypoint
    texts = {**day.outputs, "ray job info": json.dumps(info)}
    assert [f"{k}: {n}" for k, t in texts.items() for n, s in secrets.items() if s in t] == []
    logs_dir = Path(os.environ["LIVERSEG_LOG_DIR"])
    assert files_holding([stack.dir / "ray", stack.dir / "logs", logs_dir], secrets) == []
    sealed = [j for j in info if "LIVERSEG_JOB_SEALED_ENV" in json.dumps(j.get("runtime_env"))]
    assert len(sealed) == len([j for j in info if (j.get("metadata") or {}).get("liverseg.kind")]) > 0


def test_results_stay_out_of_the_callers_checkout(day):
    before, after = dict(day.checkout), day.checkout["after"]
    before.pop("after")
    assert after == before  # alice's tune-results.json untouched, nothing written beside it


def test_progress_lines_name_trials_epochs_and_early_stops(day):
    text = day.outputs["logs-alice"]  # -v: the whole driver log; progress lines carry the mark
    assert "liverseg> job " in text and "MLflow http" in text
    assert "liverseg>   trial " in text and " epoch 1/2 " in text and "ETA" in text
    assert "stopped early after epoch 1/2: val_dice" in text


def test_a_local_train_beside_the_cluster_finishes(day):
    res = day.local_train
    assert res.returncode == 0, res.stderr[-3000:]
    assert "finished: mlflow run" in res.stdout and "epoch 2/2" in res.stdout
