"""A Ray Train worker process killed by the test, by PID, mid-run: the run finishes and registers."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from support.cli import cli_cmd
from support.models import TINY


@pytest.mark.slow
def test_worker_killed_by_pid_resumes_and_registers(mlflow_uri, store_path, tmp_path):
    cmd = cli_cmd(
        "train",
        store_path,
        *TINY,
        "train.epochs=4",
        "train.steps_per_epoch=12",
        "run.max_failures=2",
        f"run.storage_path={tmp_path / 'ray'}",
        "run.name=killed",
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    client = MlflowClient(mlflow_uri)
    victim, deadline = None, time.time() + 600
    while victim is None and time.time() < deadline and proc.poll() is None:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        if runs and client.get_metric_history(runs[0].info.run_id, "val_dice"):  # epoch 0 is done
            victim = next(
                (p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])),
                None,
            )
        time.sleep(0.5)
    assert victim is not None, "no training worker to kill"
    os.kill(victim.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_dice"))
    assert steps[:1] == [0] and sorted(set(steps)) == [0, 1, 2, 3]
    assert len(steps) - len(set(steps)) <= 1  # at most the interrupted epoch is redone
    reg = subprocess.run(
        [sys.executable, "-m", "liverseg.cli", "register", "--run", runs[0].info.run_id], capture_output=True, text=True
    )
    assert reg.returncode == 0 and "registered liver-unet-candidates v1" in reg.stdout
