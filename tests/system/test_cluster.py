"""Cluster mode by configuration only: a real two-node Ray cluster on 127.0.0.1 and an MLflow server."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from support.cli import cli_cmd
from support.models import TINY


@pytest.fixture
def two_node_ray():
    """Two nodes of one CPU on 127.0.0.1, with token auth (their own token), stopped by their PIDs."""
    from liverseg.training.credentials import FORWARDED_ENV
    from support.raycluster import start_ray_head

    # the nodes know neither the tracking server nor the object store: jobs bring them (sealed, runtime_env)
    base = {k: v for k, v in os.environ.items() if k not in FORWARDED_ENV}
    head = start_ray_head(Path(tempfile.mkdtemp(prefix="lsc-", dir="/tmp")), cpus=1, base_env=base)
    try:
        head.add_node(1, base)
        yield head.gcs, {**base, **head.env}
    finally:
        head.stop()
        shutil.rmtree(head.dir, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_two_nodes_read_s3_and_log_to_server(two_node_ray, mlflow_server, store_path, tmp_path, s3):  # noqa: F811
    """Store and checkpoints in the object store, runs on the server: nothing shared but the services."""
    from liverseg.data.publish import publish_store

    address, env = two_node_ray
    store = f"{s3}/stores/slices.zarr"
    version = publish_store(store_path, store).version
    auth = {k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env = {**os.environ, **auth, "RAY_ADDRESS": address}  # the submitter's shell: tracking URI and AWS_*
    cmd = cli_cmd(
        "train",
        store,
        *TINY,
        "train.epochs=2",
        "train.steps_per_epoch=2",
        "scaling.num_workers=2",
        f"run.storage_path={s3}/ray",
        "run.name=cluster",
    )
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("liverseg").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags.get("model_uri")
    assert len(set(run.data.tags["ray_worker_nodes"].split(","))) == 2  # one worker on each node
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_dice")] == [0, 1]
    assert run.data.tags["store_path"] == f"{store}/versions/{version}"  # the version read, pinned
    import boto3

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="lake", Prefix="ray/cluster/")["Contents"]]
    assert any("/checkpoint_" in k for k in keys), keys[:20]
