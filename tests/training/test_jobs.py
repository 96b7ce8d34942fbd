"""Submitted jobs without a cluster: the slots' rules, sealed credentials, the redacting filter, who may
stop a job, where a job may read from, and the CLI's one-line refusals (the real stack:
tests/system/test_jobs.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from liverseg.core.errors import ConfigError, PermissionRefused, TrainError
from liverseg.tracking.runs import Login
from liverseg.training.admission import SETTLE_S, TTL_S, Slots
from liverseg.training.credentials import job_env_vars, seal, unseal
from liverseg.training.jobs import check_owner
from liverseg.training.search import trial_count
from liverseg.training.submit import JobSpec, is_local
from support.cli import run_liverseg

CPU1 = {"CPU": 1.0}
PW = "pw-of-" + "alice"  # a made-up password (assembled, so the repository's credential scan passes over it)


def test_slots_cap_each_person_and_serve_in_order():
    slots, free = Slots(), {"CPU": 8.0}
    assert slots.ask("a/1", "alice", "a", CPU1, 2, free, now=0)
    assert slots.ask("a/2", "alice", "a", CPU1, 2, free, now=1)
    assert not slots.ask("a/3", "alice", "a", CPU1, 2, free, now=2)  # her cap: 2 at once
    assert "alice runs 2 of 2 trials at once" in slots.leases["a/3"].why
    assert slots.ask("b/1", "bob", "b", CPU1, 2, free, now=3)  # bob is not held back by alice's cap
    assert slots.summary("a", now=3) == {"running": 2, "waiting": 1, "why": slots.leases["a/3"].why}
    slots.release("a/1")
    assert slots.ask("a/3", "alice", "a", CPU1, 2, free, now=4)
    slots.release_job("a")
    assert slots.summary("a", now=5)["running"] == 0 and "b/1" in slots.leases


def test_slots_wait_while_the_cluster_is_full_and_first_come_first_served():
    slots = Slots()
    assert not slots.ask("a/1", "alice", "a", {"CPU": 3.0}, 2, {"CPU": 2.0}, now=0)
    assert "cluster full: its workers need CPU 3, free CPU 2.00" in slots.leases["a/1"].why
    assert slots.ask("b/1", "bob", "b", CPU1, 2, {"CPU": 2.0}, now=1)  # a smaller later one may pass
    # granted a moment ago, not yet counted by Ray: its CPUs are not handed out twice
    assert not slots.ask("c/1", "carol", "c", {"CPU": 1.5}, 2, {"CPU": 2.0}, now=2)
    assert slots.ask("c/1", "carol", "c", {"CPU": 1.5}, 2, {"CPU": 2.0}, now=2 + SETTLE_S)
    # the oldest waiting request takes the CPUs first, even if a later one asks first
    slots.renew("a/1", now=3 * SETTLE_S)  # still waiting: it asks again every few seconds
    assert not slots.ask("d/1", "dave", "d", {"CPU": 3.0}, 2, {"CPU": 3.0}, now=3 + 3 * SETTLE_S)
    assert slots.ask("a/1", "alice", "a", {"CPU": 3.0}, 2, {"CPU": 3.0}, now=4 + 3 * SETTLE_S)


def test_a_slot_whose_holder_stops_beating_is_freed():
    slots = Slots()
    assert slots.ask("a/1", "alice", "a", CPU1, 1, {"CPU": 4.0}, now=0)
    assert not slots.ask("a/2", "alice", "a", CPU1, 1, {"CPU": 4.0}, now=TTL_S / 2)
    slots.renew("a/2", now=TTL_S)  # a waiting request beats by asking again; a/1 never beat again
    assert slots.ask("a/2", "alice", "a", CPU1, 1, {"CPU": 4.0}, now=TTL_S + 1)
    assert "a/1" not in slots.leases


def test_sealed_credentials_open_only_with_the_cluster_token():
    values = {"MLFLOW_TRACKING_PASSWORD": PW, "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    sealed = job_env_vars(values, token="t" * 64)
    text = next(iter(sealed.values()))
    assert list(sealed) == ["LIVERSEG_JOB_SEALED_ENV"] and PW not in text and "mlflow:5000" not in text
    assert unseal(text, "t" * 64) == values
    assert seal(values, "t" * 64) != seal(values, "t" * 64)  # a fresh salt each time
    with pytest.raises(TrainError, match="do not open with this cluster's Ray token"):
        unseal(text, "u" * 64)
    with pytest.raises(TrainError, match="MLFLOW_TRACKING_PASSWORD would travel in clear"):
        job_env_vars(values, token=None)
    assert job_env_vars({"MLFLOW_TRACKING_URI": "sqlite:////x.db"}, None) == {"MLFLOW_TRACKING_URI": "sqlite:////x.db"}


_REDACTED = """
import os, subprocess, sys
from liverseg.training.credentials import redacted_output
with redacted_output():
    print("boto said: key s3-secret-of-the-team refused", flush=True)
    subprocess.run([sys.executable, "-c", "import os; print(os.environ['AWS_SECRET_ACCESS_KEY'])"], check=True)
    os.write(2, b"stderr s3-secret-of-the-team\\n")
print("after", flush=True)
"""


def test_everything_a_driver_and_its_children_write_is_redacted():
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "s3-secret-of-the-team"}
    res = subprocess.run([sys.executable, "-c", _REDACTED], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "s3-secret-of-the-team" not in res.stdout + res.stderr and res.stdout.count("***") == 3, res.stdout
    assert res.stdout.endswith("after\n")  # the descriptors are back afterwards


@pytest.mark.parametrize(
    ("me", "action", "allowed"),
    [
        (Login("alice", verified=True), "stop", True),
        (Login("bob", verified=True), "stop", False),
        (Login("admin", is_admin=True, verified=True), "stop", True),
        (Login("admin", is_admin=True, verified=True), "resume", False),  # it would run as the admin
        (Login("alice", verified=False), "stop", False),  # a typed name, not a checked login
    ],
)
def test_only_the_owner_or_an_admin_stops_a_job(me, action, allowed):
    spec = JobSpec("tune", "tune-1", "alice", True, "s3://b/s", {}, {}, "run", "1")
    if allowed:
        check_owner(me, spec, action)
    else:
        with pytest.raises(
            PermissionRefused, match=f"refused: {me.name}.* may not {action} job tune-1: it belongs to alice"
        ):
            check_owner(me, spec, action)


def test_a_job_spec_travels_in_the_job_metadata():
    space = {"train.lr": {"grid": [1, 2, 3]}, "loss.ce_weight": {"uniform": [0, 1]}}
    spec = JobSpec(
        "tune", "tune-1", "alice", True, "s3://b/s", {"tune": {"num_samples": 2}, "space": space}, {}, "r", "1"
    )
    meta = spec.metadata()
    assert meta["liverseg.owner"] == "alice" and all(isinstance(v, str) for v in meta.values())
    assert JobSpec.from_metadata(meta) == spec and JobSpec.from_metadata({"other": "x"}) is None
    assert spec.trials == trial_count(2, space) == 6


def test_only_a_cluster_on_this_machine_reads_local_paths(tmp_path, monkeypatch):
    from liverseg.core.config import TrainConfig
    from liverseg.training.submit import _placed

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert is_local("127.0.0.1:6379") and is_local("http://localhost:8265") and not is_local("http://10.0.0.5:8265")
    with pytest.raises(ConfigError, match="--store store.zarr: on this machine only"):
        _placed(TrainConfig(), "store.zarr", "http://10.0.0.5:8265")
    cfg, store = _placed(TrainConfig(), "store.zarr", "http://127.0.0.1:8265")
    assert store == str(tmp_path / "store.zarr") and cfg.run.storage_path == str(tmp_path / "ray_results")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(ConfigError, match="tracking sqlite"):
        _placed(TrainConfig(run={"storage_path": "s3://b/ray"}), "s3://b/s", "http://10.0.0.5:8265")


def test_jobs_without_a_cluster_and_submit_with_out_are_refused_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    res = run_liverseg(["jobs"], env, cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith(
        "error: no Ray cluster: set RAY_ADDRESS"
    )
    res = run_liverseg(["tune", "--submit", "--store", "s", "--out", "r.json"], env, cwd=tmp_path)
    assert res.returncode == 2 and "a submitted search leaves its results in MLflow" in res.stderr
    res = run_liverseg(["train", "--submit", "--store", "s"], env, cwd=tmp_path)
    assert res.returncode == 2 and "error: --submit: no Ray cluster" in res.stderr


def test_the_listing_says_why_a_job_waits_and_how_to_resume_one():
    from types import SimpleNamespace as NS

    from liverseg.training.jobs import _row, format_jobs

    config = {"run": {"experiment": "alice-search"}, "tune": {"num_samples": 2}, "space": {}}
    spec = JobSpec("tune", "tune-1", "alice", True, "s3://b/s", config, {}, "r1", "1")
    state = "running; 1 waiting: alice runs 2 of 2 trials at once (team.max_trials_per_user)"
    metrics = {"trials_done": 1, "best_val_dice": 0.8, "trials_running": 2, "trials_waiting": 1}
    run = NS(data=NS(metrics=metrics, tags={"liverseg.job.state": state}), info=NS(status="RUNNING"))
    job = NS(submission_id="tune-1", status="RUNNING", start_time=1_700_000_000_000, end_time=None, message=None)
    row = _row(job, spec, run, now_ms=1_700_000_060_000)
    assert (row.status, row.trials_running, row.trials_waiting, row.duration_s) == ("RUNNING", 2, 1, 60.0)
    assert row.waiting_for.startswith("alice runs 2 of 2") and row.best_val_dice == 0.8 and not row.resumable
    run.data.tags["liverseg.job.state"] = "waiting: cluster full: its workers need CPU 1, free CPU 0.98"
    assert _row(job, spec, run, now_ms=1_700_000_060_000).status == "PENDING"  # nothing of it runs
    lost = NS(
        submission_id="tune-2", status="FAILED", start_time=1, end_time=2, message="exit 1\nliverseg> error: boom"
    )
    failed = _row(
        lost, JobSpec(**{**spec.__dict__, "job_id": "tune-2"}), NS(data=run.data, info=NS(status="FAILED")), 3
    )
    assert failed.resumable and failed.message == "error: boom" and failed.waiting_for == ""
    text = format_jobs([row, failed])
    assert text.splitlines()[0].split()[:5] == ["job", "owner", "kind", "experiment", "status"]
    assert (
        "tune-1 waits: alice runs 2 of 2" in text
        and "tune-2 ended before its tune finished: liverseg jobs resume tune-2" in text
    )


def test_two_live_searches_in_one_tune_folder_are_refused():
    from types import SimpleNamespace as NS

    from liverseg.training.submit import check_place_free

    config = {"run": {"storage_path": "s3://b/ray/"}, "tune": {"name": "liverseg-tune"}}
    spec = JobSpec("tune", "tune-1", "bob", True, "s3://b/s", config, {}, "r1", "1")
    client = NS(list_jobs=lambda: [NS(metadata=spec.metadata(), status="RUNNING")])
    with pytest.raises(TrainError, match="s3://b/ray/liverseg-tune: job tune-1 of bob runs there now"):
        check_place_free(client, "tune", "s3://b/ray/liverseg-tune")
    check_place_free(client, "tune", "s3://b/ray/alice-tune")
    client = NS(list_jobs=lambda: [NS(metadata=spec.metadata(), status="SUCCEEDED")])
    check_place_free(client, "tune", "s3://b/ray/liverseg-tune")  # an ended search leaves its folder to the next


def test_tune_puts_no_credential_in_clear_into_trial_actors(monkeypatch):
    """Ray Tune copies the driver's AWS keys into each trial actor's runtime_env, which Ray's runtime-env
    agent logs in clear (found in the stack's Ray logs by test_jobs.py): liverseg's searches leave them out."""
    from ray.tune.execution import class_cache

    from liverseg.training.tune import _keep_secrets_sealed

    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", class_cache.ENV_VARS_TO_PROPAGATE)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-s3cr3t")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id")

    class Trial:
        pass

    def runtime_env() -> dict:
        return class_cache._ActorClassCache().get(Trial)._default_options["runtime_env"]

    assert runtime_env()["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-s3cr3t"  # Ray's own behaviour
    _keep_secrets_sealed()
    assert "s3cr3t-s3cr3t" not in str(runtime_env()) and "key-id" not in str(runtime_env())
