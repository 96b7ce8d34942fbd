"""Fixtures shared by every room's tests (helpers live in `support/`): tiny phantoms and a store built
once per session, the real CT, a local Ray, an S3 server, a SQLite tracking store, the team stack."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no weight downloads in tests (users keep their network)
# command logs (liverseg.core.console) of CLI runs in tests: one temporary folder, not ./logs of the worktree
os.environ.setdefault("LIVERSEG_LOG_DIR", tempfile.mkdtemp(prefix="liverseg-test-logs-"))
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # servers the tests start: no GenAI runner

from support.paths import REAL_CT, SMALL  # noqa: E402

# Rooms whose tests start Ray (a local one, `liverseg train`/`tune` commands): with pytest-xdist they all run
# on one worker, one after another, since two Ray instances on one machine interfere (stack-facts.md)
RAY_ROOMS = ("training", "cli")


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).parent.name in RAY_ROOMS or "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(scope="session")
def real_ct() -> Path:
    assert (REAL_CT / "volume-0.nii.gz").exists(), f"real CT missing at {REAL_CT}"
    return REAL_CT


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from liverseg.data.phantoms import write_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(out, cases=6, seed=3, shape=SMALL)
    return out


@pytest.fixture(scope="session")
def store_path(tmp_path_factory, phantom_dir) -> str:
    from liverseg.core.config import IngestConfig
    from liverseg.data.ingest import ingest

    path = tmp_path_factory.mktemp("store") / "slices.zarr"
    report = ingest(phantom_dir, path, IngestConfig(size=(64, 64), workers=2), progress=False)
    assert report.ok, report.failed
    return str(path)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A real MLflow tracking server (SQLite, local artifacts) on 127.0.0.1; MLFLOW_TRACKING_URI points at it."""
    from support.servers import start_mlflow_server

    server = start_mlflow_server(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.chdir(tmp_path)
    yield server.uri
    server.stop()


@pytest.fixture
def s3(monkeypatch) -> str:
    """A moto S3 server on 127.0.0.1 (stopped after) with bucket `lake`; the client variables point at
    it as they would at MinIO/S3 (boto3, s3fs, pyarrow and DVC read AWS_ENDPOINT_URL). Returns s3://lake."""
    import boto3
    import requests
    import s3fs
    from moto.server import ThreadedMotoServer

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches clients per process: one of an earlier server

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test-key",  # moto accepts any; real ones come from the environment
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    requests.post(f"http://{host}:{port}/moto-api/reset", timeout=10).raise_for_status()  # moto state is per process
    boto3.client("s3").create_bucket(Bucket="lake")
    yield "s3://lake"
    server.stop()


@pytest.fixture(scope="module")
def team_stack():
    """The local team stack (deploy/local), up for the module's tests, down and removed after."""
    from support.stack import Stack, new_stack_dir

    stack = Stack(new_stack_dir())
    try:
        stack.up()
        yield stack
    finally:
        try:
            stack.down()
        finally:
            stack.remove()
