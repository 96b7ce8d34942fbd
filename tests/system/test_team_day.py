"""The team day on the local stack (deploy/local/up.sh): real PostgreSQL, S3, MLflow with basic-auth and
a two-node Ray cluster; alice and bob (scientists) search at the same time, rita (release) promotes,
two serve replicas follow the champion while a client keeps sending requests; down leaves nothing."""

from __future__ import annotations

import subprocess
import sys

import boto3
import httpx
import pytest
from mlflow.tracking import MlflowClient

from support.cli import run_liverseg
from support.models import TINY_SEARCH
from support.servers import start_serve, stop
from support.stack import add_team
from support.traffic import TrafficClient, wait_version

SEARCH = [*TINY_SEARCH, "train.epochs=2", "tune.max_concurrent=1"]  # 2 trials each, one at a time per user


def _search(stack, user: str, store: str, tmp_path) -> subprocess.Popen:
    bucket = stack.env["LIVERSEG_BUCKET_URL"]
    sets = [*SEARCH, f"run.experiment={user}-search", f"tune.name={user}-search", f"run.storage_path={bucket}/ray"]
    (tmp_path / user).mkdir()
    return subprocess.Popen(
        [sys.executable, "-m", "liverseg.cli", "tune", "--store", store, *[x for s in sets for x in ("--set", s)]],
        env=stack.env_for(user),
        cwd=tmp_path / user,  # nothing shared on disk: results JSON in each user's own folder
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _searches_at_once(stack, store: str, tmp_path) -> dict[str, str]:
    """alice's and bob's searches running together on the cluster; returns each parent run id."""
    procs = {user: _search(stack, user, store, tmp_path) for user in ("alice", "bob")}
    parents = {}
    try:
        for user, proc in procs.items():
            out, err = proc.communicate(timeout=1500)
            assert proc.returncode == 0, f"{user}: {err[-3000:]}"
            parents[user] = out.split("--best-of-tune-run ")[1].split(")")[0]
    finally:
        for proc in procs.values():
            stop(proc)
    return parents


def _bucket_keys(stack) -> list[str]:
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.env["AWS_ENDPOINT_URL"],
        aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    bucket = stack.env["LIVERSEG_BUCKET_URL"].removeprefix("s3://")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_team_day(team_stack, store_path, tmp_path, monkeypatch):  # noqa: F811
    stack = team_stack
    add_team(stack)
    store = f"{stack.env['LIVERSEG_BUCKET_URL']}/stores/slices.zarr"
    assert run_liverseg(["publish", "--store", store_path, "--to", store], stack.env_for("alice")).returncode == 0
    parents = _searches_at_once(stack, store, tmp_path)

    for k, v in stack.env_for("alice").items():
        monkeypatch.setenv(k, v)
    client = MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    for user in ("alice", "bob"):  # each run (parent and trials) carries its author
        exp = client.get_experiment_by_name(f"{user}-search")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) >= 3 and {r.data.tags["mlflow.user"] for r in runs} == {user}
        assert any(r.data.tags.get("mlflow.parentRunId") == parents[user] for r in runs)
    alice_exp = client.get_experiment_by_name("alice-search").experiment_id
    bob_delete = httpx.post(
        stack.env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/delete",
        json={"experiment_id": alice_exp},
        auth=("bob", stack.passwords["bob"]),
    )
    assert bob_delete.status_code == 403 and client.get_experiment(alice_exp).lifecycle_stage == "active"

    _team_promotes(stack, store, parents, tmp_path)
    keys = _bucket_keys(stack)
    assert any(k.startswith("artifacts/") and k.endswith("MLmodel") for k in keys), keys[:20]  # proxied artifacts
    for user in ("alice", "bob"):
        assert any(k.startswith(f"ray/{user}-search/") and "/checkpoint_" in k for k in keys), keys[:40]
    running = stack.processes()
    stack.down()
    assert running and stack.processes() == []


def _team_promotes(stack, store: str, parents: dict[str, str], tmp_path) -> None:
    """bob's best becomes the first champion; two replicas serve it; alice's challenger: her promote is
    refused, rita's goes through; both replicas switch under load without a failed request."""
    gate = ["promote", "--store", store, "--min-dice", "0", "--margin", "-1"]  # governance, not model quality
    assert run_liverseg(["register", "--best-of-tune-run", parents["bob"]], stack.env_for("bob")).returncode == 0
    first = run_liverseg([*gate, "--reason", "first release"], stack.env_for("rita"))
    assert first.returncode == 0 and "PROMOTED" in first.stdout, first.stderr[-2000:]
    reader = {**stack.env_for("bob"), "LIVERSEG_RELOAD_TOKEN": "reload-token-team-day"}
    replicas = [start_serve(tmp_path, "models:/liver-unet@champion", reader, "--set", "serve.poll_s=5") for _ in "ab"]
    try:
        bases = [base for _, base in replicas]
        hooks = run_liverseg(["webhook", "add", *[b + "/webhook" for b in bases]], stack.env_for("admin"))
        assert hooks.returncode == 0, hooks.stderr
        assert all(httpx.get(b + "/model").json()["version"] == "1" for b in bases)

        assert (
            run_liverseg(["register", "--best-of-tune-run", parents["alice"]], stack.env_for("alice")).returncode == 0
        )
        refused = run_liverseg([*gate, "--reason", "mine is better"], stack.env_for("alice"))
        last = refused.stderr.strip().splitlines()[-1]  # after the line naming the command's log file
        assert refused.returncode == 1 and last.startswith("error: refused: alice may not promote"), refused.stderr
        assert all(httpx.get(b + "/model").json()["version"] == "1" for b in bases)  # champion unchanged

        load = TrafficClient(bases)
        load.start()
        promoted = run_liverseg([*gate, "--reason", "alice's search, reviewed"], stack.env_for("rita"))
        assert promoted.returncode == 0 and "champion now: v2" in promoted.stdout, promoted.stdout + promoted.stderr
        for base in bases:
            wait_version(base, "2", timeout_s=60)
        load.done.set()
        load.join(timeout=120)
    finally:
        for proc, _ in replicas:
            stop(proc)
    for base, seen in load.seen.items():
        assert seen and all(status == 200 for status, _ in seen), (base, seen[-5:])
        assert [v for _, v in seen][-1] == "2"
    hist = run_liverseg(["history"], stack.env_for("alice")).stdout.splitlines()
    assert "promote  liver-unet: v1 -> v2 (candidate v2) by rita" in hist[0] and "alice's search, reviewed" in hist[0]
    assert "none -> v1 (candidate v1) by rita" in hist[1]
