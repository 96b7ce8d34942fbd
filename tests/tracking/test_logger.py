"""Rank 0's metric writer against a real tracking server that goes away and comes back: an epoch's `log`
never waits for the server, every value is written once it is back, and the log says so once each way."""

import signal
import time

import pytest
from mlflow.tracking import MlflowClient

from liverseg.core.errors import TrackingError
from liverseg.tracking.logger import MetricLogger
from support.servers import start_mlflow_server


def _wait_for(predicate, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.1)
    return predicate()


def _freeze(server, sig) -> None:
    """SIGSTOP / SIGCONT the server's whole process tree: it accepts connections and never answers."""
    import psutil

    root = psutil.Process(server.proc.pid)
    for p in [root, *root.children(recursive=True)]:
        p.send_signal(sig)


@pytest.mark.slow
def test_metrics_are_queued_through_an_outage_and_written_when_the_server_is_back(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the writer's own retries, not MLflow's backoff
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    server = start_mlflow_server(tmp_path)
    try:
        client = MlflowClient(server.uri)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        lines: list[str] = []
        logger = MetricLogger(server.uri, run_id, retry_s=0.5, say=lines.append)
        logger.log({"val_dice": 0.1, "val_loss": 0.9}, step=0)
        logger.flush(timeout_s=60)
        assert logger.written == 2 and lines == []
        _freeze(server, signal.SIGSTOP)
        for step in (1, 2, 3):  # the server does not answer: each epoch's values are queued, the call returns
            logger.log({"val_dice": step / 10, "val_loss": 1 - step / 10}, step=step)
        assert len(logger.pending) == 6 and logger.written == 2
        assert _wait_for(lambda: len(lines) == 1), lines
        assert lines[0].startswith(f"[liverseg] MLflow at {server.uri} unreachable (")
        assert "6 metric values queued" in lines[0]
        with pytest.raises(TrackingError, match=rf"6 metric values of run {run_id} not written within 1 s"):
            logger.flush(timeout_s=1)  # the end of training with the server still away: said, not lost
        _freeze(server, signal.SIGCONT)
        logger.log({"val_dice": 0.4, "val_loss": 0.6}, step=4)
        logger.flush(timeout_s=60)
        assert logger.pending == [] and logger.written == 10
        assert lines[1:] == [f"[liverseg] MLflow at {server.uri} reachable again: queued metrics written"]
        history = MlflowClient(server.uri).get_metric_history(run_id, "val_dice")
        assert sorted((m.step, m.value) for m in history) == [(0, 0.1), (1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    finally:
        _freeze(server, signal.SIGCONT)
        server.stop()


def test_without_a_run_nothing_is_queued():
    logger = MetricLogger(None, None)
    logger.log({"val_dice": 0.5}, step=0)
    logger.flush()
    assert logger.pending == [] and logger.client is None
