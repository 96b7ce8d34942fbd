"""Shared fixtures: tiny phantoms and a store built once per session, the real CT, a local Ray."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no weight downloads in tests (users keep their network)
# command logs (liverseg.console) of CLI runs in tests: one temporary folder, not ./logs of the worktree
os.environ.setdefault("LIVERSEG_LOG_DIR", tempfile.mkdtemp(prefix="liverseg-test-logs-"))
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

REPO = Path(__file__).resolve().parents[1]
REAL_CT = REPO.parent / "shared" / "data" / "real-ct"
SMALL = (64, 64, 24)  # phantom voxels: big enough for anatomy, small enough for 2 CPU cores


@pytest.fixture(scope="session")
def real_ct() -> Path:
    assert (REAL_CT / "volume-0.nii.gz").exists(), f"real CT missing at {REAL_CT}"
    return REAL_CT


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from liverseg.phantoms import write_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(out, cases=6, seed=3, shape=SMALL)
    return out


@pytest.fixture(scope="session")
def store_path(tmp_path_factory, phantom_dir) -> str:
    from liverseg.config import IngestConfig
    from liverseg.ingest import ingest

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


def copy_case(src: Path, dst: Path, n: str = "0", new_id: str | None = None) -> None:
    """Copy one LiTS pair (volume-n, segmentation-n) into dst, optionally renumbered."""
    dst.mkdir(parents=True, exist_ok=True)
    for kind in ("volume", "segmentation"):
        for f in src.glob(f"{kind}-{n}.nii*"):
            shutil.copy(f, dst / f.name.replace(f"-{n}.", f"-{new_id or n}."))


@pytest.fixture
def s3(monkeypatch) -> str:
    """A moto S3 server on 127.0.0.1 (stopped after) with bucket `lake`; the client variables point at
    it as they would at MinIO/S3 (boto3, s3fs, pyarrow and DVC read AWS_ENDPOINT_URL). Returns s3://lake."""
    import boto3
    from moto.server import ThreadedMotoServer

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
    import requests

    requests.post(f"http://{host}:{port}/moto-api/reset", timeout=10).raise_for_status()  # moto state is per process
    boto3.client("s3").create_bucket(Bucket="lake")
    yield "s3://lake"
    server.stop()


TINY = [  # a ResNet-18 U-Net with a narrow decoder, no downloaded weights: seconds per epoch on 2 cores
    "model.encoder=resnet18",
    "model.encoder_weights=none",
    "model.decoder_channels=[32,16,16,8,8]",
    "train.batch_size=8",
]


def cli_cmd(command: str, store: str | Path, *sets: str, raw: Path | None = None) -> list[str]:
    """`python -m liverseg.cli COMMAND --store STORE [--raw RAW] --set S ...` for a subprocess."""
    cmd = [sys.executable, "-m", "liverseg.cli", command, "--store", str(store)]
    return cmd + (["--raw", str(raw)] if raw else []) + [x for s in sets for x in ("--set", s)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(db: Path, artifacts: Path, port: int) -> subprocess.Popen:
    """An MLflow server on 127.0.0.1:port over SQLite `db`, serving `artifacts`; returns once /health
    answers (the caller stops it by its Popen)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}"]
    cmd += ["--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail("mlflow server did not start in 90 s")
