"""deploy/local/up.sh and down.sh: the team stack really starts, answers, keeps its data, and stops."""

from __future__ import annotations

import shutil
import subprocess
import sys

import mlflow
import pytest
import requests

from support.stack import Stack, new_stack_dir


def _check_running(stack: Stack) -> list[str]:
    """Anonymous 401, admin 200; a run's artifact lands in the bucket through the proxy; two Ray nodes."""
    import boto3

    env = stack.env
    uri = env["MLFLOW_TRACKING_URI"]
    search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=5"
    assert requests.get(search, timeout=30).status_code == 401
    admin = ("admin", env["LIVERSEG_ADMIN_PASSWORD"])
    assert requests.get(search, auth=admin, timeout=30).status_code == 200
    nodes = subprocess.run(  # a client shell with the printed lines: RAY_ADDRESS and the stack's token
        [sys.executable, "-c", "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"],
        env=stack.env_for("admin"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert nodes.stdout.split()[-1:] == ["2"], nodes.stderr[-2000:]
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    bucket = env["LIVERSEG_BUCKET_URL"].removeprefix("s3://")
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.mark.slow
def test_up_down_up_keeps_data_and_leaves_no_process(monkeypatch):
    stack = Stack(new_stack_dir())
    try:
        env = stack.up()
        assert {"MLFLOW_TRACKING_URI", "LIVERSEG_ADMIN_USER", "LIVERSEG_ADMIN_PASSWORD", "AWS_ENDPOINT_URL"} <= set(env)
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_ADDRESS", "LIVERSEG_BUCKET_URL"} <= set(env)
        assert (stack.dir / "secrets.env").stat().st_mode & 0o777 == 0o600
        # what members share holds no admin secret; those stay in admin.env
        shared, admin = (
            dict(line.split("=", 1) for line in (stack.dir / f).read_text().splitlines())
            for f in ("stack.env", "admin.env")
        )
        assert admin.keys() == {"LIVERSEG_ADMIN_USER", "LIVERSEG_ADMIN_PASSWORD", "LIVERSEG_WEBHOOK_SECRET"}
        assert {**shared, **admin} == env and not admin.keys() & shared.keys()
        assert env["LIVERSEG_ADMIN_PASSWORD"] not in (stack.dir / "stack.env").read_text()
        assert (stack.dir / "admin.env").stat().st_mode & 0o777 == 0o600
        assert env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:") and env["RAY_ADDRESS"].startswith(
            "127.0.0.1:"
        )
        assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        assert _check_running(stack) == []
        for k, v in stack.env_for("admin").items():
            monkeypatch.setenv(k, v)
        # the tracking URI from the environment only: no process-wide mlflow.set_* leaks into later tests
        kept = mlflow.MlflowClient().create_experiment("kept")
        with mlflow.start_run(experiment_id=kept) as run:
            mlflow.log_text("kept", "notes/kept.txt")
        again = stack.up()  # already running: the same lines again, nothing started twice
        assert again == env
        running = stack.processes()
        assert running
        stack.down()
        assert not [p for p in running if _alive(p)] and stack.processes() == []

        env = stack.up()  # same DIR: same database, bucket and admin password
        assert env["LIVERSEG_ADMIN_PASSWORD"] == again["LIVERSEG_ADMIN_PASSWORD"]
        keys = _check_running(stack)
        assert any(k.endswith(f"{run.info.run_id}/artifacts/notes/kept.txt") for k in keys), keys
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/notes/kept.txt") == "kept"
        running = stack.processes()
        stack.down()
        assert not [p for p in running if _alive(p)] and stack.processes() == []
    finally:
        if stack.processes():
            stack.down()
        shutil.rmtree(stack.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    from stackpids import stack_pids

    return pid in stack_pids("\0", [pid])
