"""Ray Tune search on CPU: trials as MLflow child runs, ASHA stopping, resume after a killed driver."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from liverseg.core.config import TuneConfig
from liverseg.core.console import Console, EpochView
from liverseg.core.loading import load_config
from liverseg.training.search import build_space
from liverseg.training.tune import tune_search
from liverseg.training.tune_report import write_dvc_plots
from support.cli import cli_cmd
from support.models import TINY
from support.models import TINY_SEARCH as BASE
from support.servers import stop_tree, tree_pids


def _children(client, parent):
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def _project_here(store_path) -> str:
    """Make the working directory a project: a git commit and a dvc.lock naming the store; returns HEAD."""
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "project"], check=True)
    lock = {
        "schema": "2.0",
        "stages": {"ingest": {"outs": [{"path": os.path.relpath(store_path), "md5": "5t0re.dir"}]}},
    }
    Path("dvc.lock").write_text(json.dumps(lock))  # YAML is a superset of JSON
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
def test_search_four_trials_two_concurrent(ray_local, mlflow_uri, store_path, tmp_path):
    head = _project_here(store_path)  # mlflow_uri made tmp_path the working directory
    cfg = load_config(TuneConfig, None, [*BASE, "tune.max_concurrent=2", f"run.storage_path={tmp_path / 'ray'}"])
    view = EpochView(Console(io.StringIO()), total=4 * 3)
    summary = tune_search(store_path, cfg, results_path=tmp_path / "tune-results.json", view=view)
    client = MlflowClient(mlflow_uri)
    kids = _children(client, summary.parent_run_id)
    assert len(kids) == 4 and len({k.data.tags["liverseg.run_key"] for k in kids}) == 4
    statuses = {k.data.tags["trial_status"] for k in kids}
    assert "early-stopped" in statuses and "completed" in statuses
    stopped = client.search_runs(  # the README's filter for pruned trials
        [kids[0].info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}' and tags.trial_status = 'early-stopped'",
    )
    assert {r.info.run_id for r in stopped} == {
        k.info.run_id for k in kids if k.data.tags["trial_status"] == "early-stopped"
    }
    for k in kids:  # lineage read where the search was started, not in the trial's own folder
        assert k.data.tags["git_commit"].startswith(head) and k.data.tags["dvc_store_md5"] == "5t0re.dir"
        expected = {"completed": "FINISHED", "early-stopped": "FINISHED", "failed": "FAILED"}[
            k.data.tags["trial_status"]
        ]
        assert k.info.status == expected
        if k.data.tags["trial_status"] == "completed":
            assert k.data.tags.get("model_uri") and len(client.get_metric_history(k.info.run_id, "val_dice")) == 3
    best_dice = max(t.val_dice for t in summary.trials if t.model_uri)  # only these can be registered
    # 6 steps per trial are too few for the learning rate to tell on Dice (noise ~0.05): the learning
    # itself is test_train's; here, the best is the best trial that can be registered, everywhere.
    assert summary.best.val_dice == best_dice
    assert summary.best.status == "completed" and summary.best.model_uri
    results = json.loads((tmp_path / "tune-results.json").read_text())
    assert results["best"]["run_id"] == summary.best.run_id and results["best"]["model_uri"]
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.metrics["best_val_dice"] == pytest.approx(best_dice)
    assert parent.data.params["search"] == "grid" and parent.data.tags["git_commit"].startswith(head)
    assert parent.data.tags["best.train.lr"] == str(summary.best.params["train.lr"])
    # the parent run's description names the best trial and tabulates every trial; the same as a table
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith(f"**Best trial** `{summary.best.trial_id}`") and note.count("\n| ") == 1 + 4
    table = json.loads(Path(client.download_artifacts(summary.parent_run_id, "trials.json", str(tmp_path))).read_text())
    assert table["columns"][:4] == ["trial", "status", "epochs", "val_dice"] and "train_lr" in table["columns"]
    # the terminal's progress view: one line per trial epoch, with the metric, elapsed time and ETA; a line
    # when a trial starts and when one is stopped early, saying why
    lines = view.console.stream.getvalue().splitlines()
    ran = sum(t.epochs for t in summary.trials)
    epochs = [ln for ln in lines if "ETA" in ln]
    assert len(epochs) == ran == view.done and all("val_dice" in ln for ln in epochs), lines
    assert view.total == ran  # early-stopped trials' epochs left the estimate
    assert sum(" starts: train.lr " in ln for ln in lines) == 4
    pruned = [t for t in summary.trials if t.status == "early-stopped"]
    assert sum("stopped early after epoch" in ln and "ASHA keeps the best 1/2" in ln for ln in lines) == len(pruned)
    # every trial ranks by its best score in MLflow, the pruned ones too; the parent counts trials done
    assert all(k.data.metrics.get("best_val_dice") is not None for k in kids)
    assert parent.data.metrics["trials_done"] == 4
    # what `dvc plots` draws: the search (val_dice against each searched key) and the best trial's curves
    search, curves = write_dvc_plots(client, summary, tmp_path / "plots")
    rows = json.loads(search.read_text())
    assert [r["trial"] for r in rows] == [t.trial_id for t in summary.trials] and "train_lr" in rows[0]
    assert [c["epoch"] for c in json.loads(curves.read_text())] == [0, 1, 2]


def test_space_errors_list_choices():
    from liverseg.core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown training key 'train.lrr'"):
        build_space({"train.lrr": {"uniform": [0, 1]}})
    with pytest.raises(ConfigError, match="loguniform, uniform, choice, grid, randint"):
        build_space({"train.lr": {"normal": [0, 1]}})
    with pytest.raises(ConfigError, match="low < high"):
        build_space({"train.lr": {"uniform": [1, 0]}})


@pytest.mark.slow
def test_resume_after_killed_driver(mlflow_uri, store_path, tmp_path):
    cmd = _tune_cmd(store_path, tmp_path, "tune.max_concurrent=1")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = MlflowClient(mlflow_uri)
    deadline = time.time() + 600
    finished = []
    while time.time() < deadline and proc.poll() is None:
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string="tags.`liverseg.run_key` LIKE 'liverseg-tune/%'",
        )
        finished = [r for r in runs if r.data.tags.get("model_uri")]
        if finished:
            break
        time.sleep(2)
    assert finished, "no trial finished before the deadline"
    started = tree_pids(proc.pid)  # the driver and the local Ray it started (never `ray stop`: every Ray)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray die mid-search
    proc.wait()
    stop_tree(started, timeout_s=0)
    res = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads((tmp_path / "r.json").read_text())
    assert len(results["trials"]) == 4
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`liverseg.run_key` LIKE 'liverseg-tune/%'",
    )
    keys = [r.data.tags["liverseg.run_key"] for r in runs]
    assert len(keys) == len(set(keys)) == 4  # no trial's run duplicated
    first = next(r for r in runs if r.info.run_id == finished[0].info.run_id)
    assert len(client.get_metric_history(first.info.run_id, "val_dice")) == 3  # not retrained


@pytest.mark.slow
def test_search_reads_store_and_keeps_state_in_s3(s3, mlflow_uri, store_path, tmp_path):
    """Store, checkpoints and Tune state in the object store; the best trial registered from MLflow alone."""
    import boto3

    from liverseg.data.publish import publish_store

    store = f"{s3}/stores/slices.zarr"
    version = publish_store(store_path, store).version
    sets = [*BASE, "tune.max_concurrent=1", "train.epochs=2", f"run.storage_path={s3}/ray"]
    cli = [sys.executable, "-m", "liverseg.cli"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}  # AWS_* point at the moto server (fixture)
    res = subprocess.run(
        [*cli, "tune", "--store", store, *[x for s in sets for x in ("--set", s)], "--out", str(tmp_path / "r.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    parent = res.stdout.split("--best-of-tune-run ")[1].split(")")[0]
    (tmp_path / "r.json").unlink()  # a cluster job keeps nothing on the pod's disk
    reg = subprocess.run([*cli, "register", "--best-of-tune-run", parent], env=env, capture_output=True, text=True)
    assert reg.returncode == 0, reg.stderr
    client = MlflowClient(mlflow_uri)
    mv = client.get_model_version_by_alias("liver-unet-candidates", "challenger")
    assert mv.run_id == client.get_run(parent).data.tags["best_run_id"]
    # trained from the bucket, every trial on the version current when the search started
    assert client.get_run(mv.run_id).data.tags["store_path"] == f"{store}/versions/{version}"
    keys = [
        o["Key"]
        for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="lake", Prefix="ray/")
        for o in page.get("Contents", [])
    ]
    assert any("/checkpoint_" in k for k in keys), keys[:20]  # Ray Train checkpoints of the trials
    assert any(k.startswith("ray/liverseg-tune/") and "experiment_state" in k for k in keys), keys[:20]  # Tune state


@pytest.mark.parametrize("epochs", [2, 4])
def test_asha_never_stops_a_trial_at_its_last_epoch(ray_local, tmp_path, epochs):
    """With a power-of-2 epoch count ASHA had a rung at the last epoch and stopped a trial there, before
    its model was logged. A real Tune run with the project's scheduler: trial B is good until its last
    epoch, then the worst; C is bad from the start (ASHA must really stop it)."""
    from ray import tune

    from liverseg.training.search import make_scheduler

    cfg = load_config(TuneConfig, None, [f"train.epochs={epochs}", "tune.grace_period=1", "tune.reduction_factor=2"])
    curves = {"A": [0.5] * (epochs - 1) + [0.9], "B": [0.6] * (epochs - 1) + [0.1], "C": [0.1] * epochs}

    def trainable(config):  # nested: Ray ships it by value
        for epoch, dice in enumerate(config["curves"][config["trial"]]):
            tune.report({"val_dice": dice, "epoch": epoch})
        Path(config["out"], config["trial"]).write_text("model")  # what a trial logs after its last epoch

    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(curves)), "curves": curves, "out": str(tmp_path)},
        tune_config=tune.TuneConfig(scheduler=make_scheduler(cfg), max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), verbose=0),
    )
    ran = {r.config["trial"]: int(r.metrics["epoch"]) + 1 for r in tuner.fit()}
    models = {p.name for p in tmp_path.iterdir() if p.is_file()}
    assert ran["C"] < epochs and "C" not in models  # early stopping really stops
    assert ran["B"] == epochs and "B" in models  # never stopped at its last epoch
    assert all(name in models for name, n in ran.items() if n == epochs)  # every full trial has its model


def _tune_cmd(store_path, tmp_path, *sets: str) -> list[str]:
    return [
        *cli_cmd("tune", store_path, *BASE, f"run.storage_path={tmp_path / 'ray'}", *sets),
        "--out",
        str(tmp_path / "r.json"),
    ]


@pytest.mark.slow
def test_search_finishes_beside_a_cpu_hog(mlflow_uri, store_path, tmp_path):
    """The search that hung twice (4 trials, 2 concurrent, 3 epochs, 6 phantoms, ASHA stopping half),
    with a process burning a core beside it: it ends, every trial with a model or early-stopped."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        res = subprocess.run(
            _tune_cmd(store_path, tmp_path, "tune.max_concurrent=2"),
            env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri},
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        hog.kill()
        hog.wait()
    assert res.returncode == 0, res.stderr[-3000:]
    trials = json.loads((tmp_path / "r.json").read_text())["trials"]
    assert len(trials) == 4 and {t["status"] for t in trials} == {"completed", "early-stopped"}
    assert all(t["model_uri"] for t in trials if t["status"] == "completed")
    assert all(t["epochs"] < 3 or t["model_uri"] for t in trials)  # only a trial stopped early lacks a model


@pytest.mark.slow
@pytest.mark.parametrize("command", ["tune", "train"])
def test_ctrl_c_ends_the_run_in_seconds_marked_killed(mlflow_uri, store_path, tmp_path, command):
    """SIGINT to the process group (what Ctrl-C sends): exit 130 with one line, MLflow runs KILLED."""
    long = ["train.epochs=40", "train.steps_per_epoch=4"]
    if command == "tune":
        cmd = _tune_cmd(store_path, tmp_path, "tune.max_concurrent=1", *long)
    else:
        cmd = cli_cmd("train", store_path, *TINY, *long, f"run.storage_path={tmp_path / 'ray'}")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    client = MlflowClient(mlflow_uri)
    client.search_experiments()  # the schema is made once, here: two processes creating it at once race
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait for an epoch: training is under way
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        if any(r.data.metrics.get("val_dice") is not None for r in runs):
            break
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("still running 60 s after Ctrl-C")
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: interrupted")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]


def test_a_search_saved_by_an_older_liverseg_resumes_with_one_line_not_a_traceback(
    ray_local, mlflow_uri, store_path, tmp_path
):
    """liverseg 0.1 kept its scheduler in liverseg.tune_guard (now liverseg.training.tune_guard): Ray's saved
    search names that module, so unpickling it fails. A search saved with a scheduler of a module that is
    gone afterwards stands for it."""
    import types

    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from liverseg.core.errors import TrainError

    old = types.ModuleType("liverseg.tune_guard")
    old.LastEpochKeptASHA = type("LastEpochKeptASHA", (FIFOScheduler,), {"__module__": "liverseg.tune_guard"})
    sys.modules["liverseg.tune_guard"] = old
    try:

        def trainable(config):  # nested: Ray ships it by value
            tune.report({"val_dice": 0.5, "epoch": 0})

        tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(scheduler=old.LastEpochKeptASHA(), num_samples=1),
            run_config=tune.RunConfig(name="old-search", storage_path=str(tmp_path / "ray"), verbose=0),
        ).fit()
    finally:
        del sys.modules["liverseg.tune_guard"]
    cfg = load_config(TuneConfig, None, [*BASE, f"run.storage_path={tmp_path / 'ray'}", "tune.name=old-search"])
    with pytest.raises(TrainError) as err:
        tune_search(store_path, cfg, resume=True, results_path=tmp_path / "r.json")
    msg = str(err.value)
    assert "saved by an older liverseg (its state names liverseg.tune_guard" in msg and "\n" not in msg
    assert "git checkout COMMIT && make setup && liverseg tune --resume" in msg and "--set tune.name=NEW" in msg
    assert (
        MlflowClient(mlflow_uri).search_runs([e.experiment_id for e in MlflowClient(mlflow_uri).search_experiments()])
        == []
    )
