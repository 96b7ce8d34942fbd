"""The worker loop keeps training while the tracking server is away: a real `liverseg train` (its own local
Ray) against a real MLflow server that is stopped for a minute mid-run and started again on the same data.
(The metric queue itself, without Ray: tests/tracking/test_logger.py.)"""

import os
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

from support.cli import cli_cmd
from support.models import TINY
from support.servers import start_mlflow_server

EPOCHS = 12
OUTAGE_S = 60


def _wait_for_epoch(uri: str, step: int, proc: subprocess.Popen, timeout_s: float = 600) -> str:
    """The run id once its val_dice has `step`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("liverseg")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and any(m.step >= step for m in client.get_metric_history(runs[0].info.run_id, "val_dice")):
            return runs[0].info.run_id
        time.sleep(1)
    raise AssertionError(f"epoch {step} not logged: {proc.poll()}")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_minute_without_the_tracking_server_stalls_no_epoch_and_loses_no_metric(store_path, tmp_path):
    server = start_mlflow_server(tmp_path / "mlflow")
    port = int(server.uri.rsplit(":", 1)[1])
    sets = [*TINY, f"train.epochs={EPOCHS}", "train.steps_per_epoch=4", f"run.storage_path={tmp_path / 'ray'}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
    proc = subprocess.Popen(
        cli_cmd("train", store_path, *sets), env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        run_id = _wait_for_epoch(server.uri, 0, proc)
        server.stop()
        down = time.time()
        time.sleep(OUTAGE_S)
        server = start_mlflow_server(tmp_path / "mlflow", port)
        up = time.time()
        out, err = proc.communicate(timeout=900)
        history = MlflowClient(server.uri).get_metric_history(run_id, "val_dice")
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert proc.returncode == 0, err.decode()[-3000:]
    terminal = err.decode().splitlines()
    assert len([line for line in terminal if " unreachable: training goes on" in line]) == 1, terminal
    assert sorted(m.step for m in history) == list(range(EPOCHS))  # every epoch's value, none twice
    during = [m.step for m in history if down < m.timestamp / 1000 < up]
    assert len(during) >= 2, (down, up, [(m.step, m.timestamp) for m in history])  # epochs went on meanwhile
