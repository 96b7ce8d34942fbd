"""Rank 0's MLflow writer against a tracking server that goes down mid-run and comes back."""

import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port, start_mlflow_server
from liverseg.train_loop import MetricLogger


def test_metrics_survive_a_tracking_outage(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path / "db.sqlite", tmp_path / "art", port)
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
    server = start_mlflow_server(tmp_path / "db.sqlite", tmp_path / "art", port)
    try:
        logger.log({"val_dice": 0.3}, step=2)  # back: the kept value goes out with the new one
        assert logger.pending == []
        steps = sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "val_dice"))
        assert steps == [(0, 0.1), (1, 0.2), (2, 0.3)]
    finally:
        server.terminate()
        server.wait(timeout=30)
