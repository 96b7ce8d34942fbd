"""Cluster mode by configuration only: a real two-node Ray cluster on 127.0.0.1 and an MLflow server."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from test_registry import mlflow_server  # noqa: F401  (fixture)

RAY = str(Path(sys.executable).parent / "ray")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_node_ray(tmp_path):
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"
    head = [
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-cpus",
        "1",
        "--include-dashboard",
        "true",
        "--dashboard-port",
        str(_free_port()),
    ]
    subprocess.run([RAY, "start", *head], env=env, check=True, capture_output=True, timeout=120)
    try:
        subprocess.run(
            [RAY, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", "--num-cpus", "1"],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.slow
def test_two_workers_on_two_nodes_log_to_server(two_node_ray, mlflow_server, store_path, tmp_path):  # noqa: F811
    address, env = two_node_ray
    env = {**env, "RAY_ADDRESS": address, "MLFLOW_TRACKING_URI": mlflow_server}
    cmd = [
        sys.executable,
        "-m",
        "liverseg.cli",
        "train",
        "--store",
        store_path,
        "--set",
        "model.encoder=resnet18",
        "--set",
        "model.encoder_weights=none",
        "--set",
        "model.decoder_channels=[32,16,16,8,8]",
        "--set",
        "train.epochs=2",
        "--set",
        "train.steps_per_epoch=2",
        "--set",
        "train.batch_size=8",
        "--set",
        "scaling.num_workers=2",
        "--set",
        f"run.storage_path={tmp_path / 'shared'}",
        "--set",
        "run.name=cluster",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("liverseg").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags.get("model_uri")
    assert len(set(run.data.tags["ray_worker_nodes"].split(","))) == 2  # one worker on each node
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_dice")] == [0, 1]
