"""Rank 0's MLflow writer against a tracking server that goes down mid-run and comes back."""

import subprocess
import sys
import time

import httpx
import pytest
from mlflow.tracking import MlflowClient

from liverseg.train_loop import MetricLogger
from test_registry import _free_port


def _start(db, art, port):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            str(art),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(180):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail("mlflow server did not start")


def test_metrics_survive_a_tracking_outage(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start(tmp_path / "db.sqlite", tmp_path / "art", port)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    logger = MetricLogger(uri, run_id)
    logger.log({"val_dice": 0.1}, step=0)
    server.terminate()
    server.wait(timeout=30)
    logger.log({"val_dice": 0.2}, step=1)  # server down: kept, not lost, training goes on
    assert len(logger.pending) == 1
    with pytest.raises(RuntimeError, match="could not be written"):
        logger.flush()  # at the end of training an unwritten batch is an explicit error
    server = _start(tmp_path / "db.sqlite", tmp_path / "art", port)
    try:
        logger.log({"val_dice": 0.3}, step=2)  # back: the kept value goes out with the new one
        assert logger.pending == []
        steps = sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "val_dice"))
        assert steps == [(0, 0.1), (1, 0.2), (2, 0.3)]
    finally:
        server.terminate()
        server.wait(timeout=30)
