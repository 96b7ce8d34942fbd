"""The user's next step: the MLflow UI lists the tuning trials (headless Chromium, Debian's package)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from liverseg.config import TuneConfig, load_config
from liverseg.tune import tune_search
from test_registry import _free_port
from test_tune import BASE

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--virtual-time-budget=20000", "--window-size=1500,900"]


@pytest.mark.slow
def test_mlflow_ui_lists_tuning_trials(ray_local, mlflow_uri, store_path, tmp_path):
    cfg = load_config(TuneConfig, None, [*BASE, "tune.max_concurrent=2", f"run.storage_path={tmp_path / 'ray'}"])
    summary = tune_search(store_path, cfg, results_path=tmp_path / "r.json")
    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", mlflow_uri, "--host", "127.0.0.1", "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        for _ in range(120):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(mlflow_uri).get_experiment_by_name("liverseg").experiment_id
        url = f"http://127.0.0.1:{port}/#/experiments/{exp}/runs"
        profile = tmp_path / "chrome"
        dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        listed = [t["trial_id"] for t in summary.trials if t["trial_id"] in dom]
        assert "liverseg-tune" in dom and len(listed) == len(summary.trials), dom[-2000:]
        shot = tmp_path / "mlflow-ui.png"
        subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", url], capture_output=True, timeout=120)
        assert shot.stat().st_size > 10_000
        if os.environ.get("LIVERSEG_SCREENSHOT_DIR"):  # how docs/img/mlflow-ui.png was made
            shutil.copy(shot, Path(os.environ["LIVERSEG_SCREENSHOT_DIR"]) / "mlflow-ui.png")
    finally:
        ui.terminate()
        ui.wait(timeout=30)
