"""Rank 0's MLflow writer against a tracking server that goes down mid-run and comes back."""

import pytest
from mlflow.tracking import MlflowClient

from liverseg.tracking.logger import MetricLogger
from support.net import free_port
from support.servers import start_mlflow_server


def test_metrics_survive_a_tracking_outage(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    uri = server.uri
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    logger = MetricLogger(uri, run_id)
    logger.log({"val_dice": 0.1}, step=0)
    server.stop()
    logger.log({"val_dice": 0.2}, step=1)  # server down: kept, not lost, training goes on
    assert len(logger.pending) == 1
    with pytest.raises(RuntimeError, match="could not be written"):
        logger.flush()  # at the end of training an unwritten batch is an explicit error
    server = start_mlflow_server(tmp_path, port)
    try:
        logger.log({"val_dice": 0.3}, step=2)  # back: the kept value goes out with the new one
        assert logger.pending == []
        steps = sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "val_dice"))
        assert steps == [(0, 0.1), (1, 0.2), (2, 0.3)]
    finally:
        server.stop()
