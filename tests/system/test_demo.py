"""`scripts/demo.sh` (what `make demo` runs) on a copy of the repository, then its MLflow UI in Chromium."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from support.net import free_port
from support.worktree import BIN, clone_worktree, sh, user_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
CHROMIUM = "/usr/bin/chromium"
# Flags for a closed network: without them Chromium keeps dialling Google's hosts.
COLUMNS = ["val_dice", "train.lr", "loss.dice_weight", "loss.ce_weight"]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _run_count(client: MlflowClient) -> int:
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("clone")
    clone_worktree(repo)
    res = subprocess.run(
        ["bash", "scripts/demo.sh"],
        cwd=repo,
        env=user_env(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert res.returncode == 0, res.stdout[-6000:]
    return repo, res.stdout


def test_demo_then_rerun_changes_nothing(demo):
    repo, out = demo
    for stage in ("ingest", "tune", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out
    # quiet by default: stdout and stderr together under 80 lines, one per trial epoch, Ray's tables in logs/
    lines = out.splitlines()
    assert len(lines) < 80, out
    assert sum(" epoch " in ln and "ETA" in ln for ln in lines) >= 4, out
    assert not any("PreemptionWatcher" in ln or "Trial status" in ln for ln in lines), out
    tune_log = next((repo / "logs").glob("tune-*.log"))
    assert "liverseg-tune" in tune_log.read_text()  # what the terminal did not show is in the log
    test = json.loads((repo / "metrics" / "test-metrics.json").read_text())
    assert test["dice"]["mean"] > 0.9 and test["split"] == "test", test["dice"]
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("liver-unet", "champion")
    assert float(champion.tags["test_dice"]) > 0.9
    # the champion's lineage as `liverseg lineage` prints it: this repository's commit, DVC's hash of
    # the store, and the training and validation splits unchanged since training
    lineage = sh(["liverseg", "lineage", "models:/liver-unet@champion"], repo).splitlines()
    head = sh(["git", "rev-parse", "HEAD"], repo).strip()
    assert any(ln.split()[:2] == ["commit", head] or ln.split()[:2] == ["commit", f"{head}-dirty"] for ln in lineage), (
        lineage
    )
    assert not any("untracked" in ln for ln in lineage), lineage
    assert {ln.split()[0] for ln in lineage if "(as trained)" in ln} == {"train", "val"}, lineage
    runs = _run_count(client)

    again = sh(["bash", "scripts/demo.sh"], repo)
    assert "Running stage" not in again
    assert all(f"Stage '{stage}' didn't change" in again for stage in ("ingest", "tune", "evaluate", "register"))
    assert "already champion" in again
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo)
    assert _run_count(client) == runs
    assert client.get_model_version_by_alias("liver-unet", "champion").version == champion.version


@pytest.fixture
def mlflow_ui(demo):
    repo, _ = demo
    port = free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "ui",
            "--backend-store-uri",
            f"sqlite:///{repo / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=user_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                break
        except requests.ConnectionError:
            time.sleep(1)
    else:
        pytest.fail("mlflow ui did not answer /health within 120 s")
    yield url, MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    os.killpg(proc.pid, 15)
    proc.wait(30)


def test_mlflow_ui_lists_tuning_trials(mlflow_ui, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: apt-get install chromium (Debian's package)"
    url, client = mlflow_ui
    exp = client.get_experiment_by_name("liverseg")
    parent = client.search_runs([exp.experiment_id], "tags.`liverseg.kind` = 'tune'")[0]
    trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(trials) == 4
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1900, "height": 600})
        page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
        row = page.locator(".ag-row", has=page.get_by_role("link", name=parent.info.run_name, exact=True))
        row.wait_for(timeout=90_000)
        close_assistant = page.locator("button[data-component-id='mlflow.assistant.chat_panel.close']")
        if close_assistant.count():  # MLflow 3.17 may open its chat panel over the runs table
            close_assistant.first.click()
        row.locator("button[data-component-id*=runnamecellrenderer]").click()  # unfold the nested trials
        for t in trials:
            page.get_by_role("link", name=t.info.run_name, exact=True).wait_for(timeout=30_000)
        # The comparison a user makes: the selection metric and the searched parameters as columns
        # (Source off, so that the grid, which renders only columns in view, shows them).
        page.get_by_role("button", name="Columns", exact=True).click()
        tree = page.locator("[data-testid=column-selector-tree]")
        for col in ("Source", *COLUMNS):
            page.get_by_placeholder("Search columns").fill(col)
            tree.locator(".du-bois-light-tree-title").filter(has_text=re.compile(f"^{re.escape(col)}$")).first.click()
        page.keyboard.press("Escape")
        deadline = time.time() + 15
        while not all(c in (header := page.locator(".ag-header-cell").all_inner_texts()) for c in COLUMNS):
            assert time.time() < deadline, f"columns {COLUMNS} not in the runs table header {header}"
            page.wait_for_timeout(250)
        # and the data each trial trained on: the Dataset column (store/split, digest, context)
        page.locator(".ag-cell", has_text="store.zarr/train").first.wait_for(timeout=15_000)
        page.screenshot(path=str(tmp_path / "mlflow-ui.png"))
        # the search's parent run: its description names the best trial and tabulates the trials
        page.set_viewport_size({"width": 1600, "height": 1000})
        page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}")
        page.get_by_text("Best trial", exact=False).first.wait_for(timeout=60_000)
        page.screenshot(path=str(tmp_path / "mlflow-search.png"))
        # the served model's page: its Markdown description (LiTS test Dice, versions, promotion rule)
        page.goto(f"{url}/#/models/liver-unet")
        page.get_by_text("Test Dice is the LiTS convention", exact=False).first.wait_for(timeout=60_000)
        page.screenshot(path=str(tmp_path / "mlflow-model.png"))
        browser.close()
    for shot in ("mlflow-ui.png", "mlflow-search.png", "mlflow-model.png"):
        assert (tmp_path / shot).stat().st_size > 10_000, shot
    # the champion's logged model carries its saved epoch's metrics, not epoch 0's
    champ = client.get_model_version_by_alias("liver-unet", "champion")
    run = client.get_run(champ.run_id)
    logged = client.get_logged_model(run.data.tags["model_uri"].removeprefix("models:/"))
    val = {m.key: m.value for m in logged.metrics}["val_dice"]
    assert val == pytest.approx(float(run.data.tags["best_val_dice"]), abs=1e-6)
    assert any(k.startswith("system/") for k in run.data.metrics)
