"""Train: a ResNet-50 U-Net on Ray Train from the slice store, one MLflow run per training.

The driver opens (or re-opens, on resume) the MLflow run, computes the training split's
normalisation statistics, shares the cases over the workers and starts a TorchTrainer; rank 0 logs
per-epoch metrics; afterwards the driver logs the best model as a pyfunc with its preprocessing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from liverseg.core import env
from liverseg.core.config import TrainConfig
from liverseg.core.console import EpochView, root_cause, watch_run
from liverseg.core.errors import TrainError
from liverseg.core.loading import to_flat_dict
from liverseg.data.store import SliceStore
from liverseg.model.artifact import ModelSpec, load_local, save_local, spec_for
from liverseg.model.plots import curves_png, overlay_png
from liverseg.tracking import tags
from liverseg.tracking.models import log_model
from liverseg.tracking.provenance import config_hash, store_datasets
from liverseg.tracking.runs import author, check_tracking, experiment_id, find_run, tracking_uri
from liverseg.tracking.runs import client as mlflow_client
from liverseg.training.batches import assign_cases, norm_stats
from liverseg.training.loop import BEST_FILE, LoopConfig, worker_loop
from liverseg.training.runtime import ensure_ray, lineage_tags, preflight, storage_path

MODEL_NAME = "model"
WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train V2 (2.60): 60 s by default


@dataclass
class TrainResult:
    run_id: str
    run_name: str
    best_val_dice: float
    best_epoch: int
    model_uri: str
    resumed_finished: bool = False


def _open_run(client, cfg: TrainConfig, key: str, name: str, run_tags: dict[str, str], parent_run_id: str | None):
    exp = experiment_id(client, cfg.run.experiment)
    existing = find_run(client, exp, key)
    if existing is not None:
        return existing, True
    all_tags = {tags.RUN_KEY: key, tags.MLFLOW_USER: author(), **run_tags}
    if parent_run_id:
        all_tags[tags.MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(exp, run_name=name, tags=all_tags)
    flat = to_flat_dict(cfg)
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in flat.items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return run, False


def _open_store(store_path: str) -> tuple[str, SliceStore]:
    """The store (absolute when local: Ray workers run in other directories; for a published store, the
    version read now, pinned: workers and the run's tags name that one); needs train and val cases."""
    if "://" not in store_path:
        store_path = str(Path(store_path).resolve())
    store = SliceStore(store_path)
    n_train, n_val = len(store.cases_in("train")), len(store.cases_in("val"))
    if not n_train or not n_val:
        raise TrainError(f"{store_path}: needs train and val cases, has {n_train} and {n_val}")
    return store.pinned_url, store


def _fault_injection(cfg: TrainConfig, name: str) -> dict[str, Any]:
    """The tests' crash (`env.FAIL_AT_EPOCH`): that epoch, and a marker file that makes it happen once."""
    epoch, root = env.fail_at_epoch(), storage_path(cfg)
    if epoch is None or "://" in root:
        return {}
    return {"fail_at_epoch": epoch, "fault_marker": f"{root}/{name}/.fault-injected"}


def _loop_config(cfg: TrainConfig, store: SliceStore, store_path: str, spec: ModelSpec, run_id: str) -> LoopConfig:
    """What every worker gets: config, spec, its share of cases (balanced by slices), where to log."""
    workers = cfg.scaling.num_workers
    train_cases, val_cases = store.cases_in("train"), store.cases_in("val")
    slices = {c: store.num_slices(c) for c in train_cases}
    return LoopConfig(
        cfg=cfg,
        spec=spec,
        store=store_path,
        train_shares=assign_cases(slices, workers),
        train_slices=sum(slices.values()),
        val_cases=val_cases,
        val_shares=assign_cases({c: store.num_slices(c) for c in val_cases}, workers),
        tracking_uri=tracking_uri(),
        run_id=run_id,
    )


def _fit(cfg: TrainConfig, name: str, loop_config: LoopConfig, callbacks: list[Any] | None):
    """Run `worker_loop` on Ray Train (resuming the named run from its checkpoint); Ray's Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray(cfg.run.ray_address)
    os.environ[WORKER_START_TIMEOUT_ENV] = str(cfg.run.worker_start_timeout_s)  # Train passes it to its controller
    sc = cfg.scaling
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=loop_config.to_ray(),
        scaling_config=ScalingConfig(
            num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker={"CPU": sc.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path(cfg),
            failure_config=FailureConfig(
                max_failures=cfg.run.max_failures, controller_failure_limit=cfg.run.start_retries
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=2),  # latest two; each holds the best weights so far
            callbacks=callbacks or [],
        ),
    )
    return _off_the_main_thread(trainer.fit)


def _off_the_main_thread(fn):
    """fn() in a daemon thread, so that Ctrl-C reaches the main thread as KeyboardInterrupt: run in the
    main thread, Ray Train installs its own SIGINT handler, which aborts training and then returns as if
    it had ended (the run was finished, not KILLED, and the CLI exited 1)."""
    import threading

    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # handed to the caller as it is
            out["error"] = e

    worker = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
    if "error" in out:
        raise out["error"]
    return out["result"]


def _finish(client, run_id: str, name: str, result, spec: ModelSpec, store: SliceStore, cfg: TrainConfig):
    """Log the best checkpoint's model and close the MLflow run; the TrainResult."""
    if result.checkpoint is None:
        client.set_terminated(run_id, "FAILED")
        raise TrainError(f"training run {name} reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        best = torch.load(Path(d) / BEST_FILE, map_location="cpu", weights_only=True)
    model_uri = log_best_model(client, run_id, best, spec, store, cfg)
    client.set_tag(run_id, tags.BEST_VAL_DICE, f"{best['val_dice']:.6f}")
    client.set_tag(run_id, tags.BEST_EPOCH, str(best["epoch"]))
    client.set_tag(run_id, tags.MODEL_URI, model_uri)
    client.set_terminated(run_id, "FINISHED")
    return TrainResult(run_id, name, float(best["val_dice"]), int(best["epoch"]), model_uri)


@dataclass
class OpenedRun:
    """A training run in MLflow, found by its key or just created (params, lineage tags, datasets)."""

    run: Any
    existed: bool
    name: str
    store_path: str  # absolute, or a URL
    store: SliceStore


def open_training_run(
    store_path: str,
    cfg: TrainConfig,
    run_key: str | None = None,
    parent_run_id: str | None = None,
    lineage: dict[str, str] | None = None,
    extra_tags: dict[str, str] | None = None,
) -> OpenedRun:
    """`cfg`'s training run on the store: found by key (`run_key`, else the run name), else created with
    every config key as a param, the lineage tags (read here unless given) and the store's splits.
    `liverseg train --submit` opens it on the submitter's machine, where git and dvc.lock are."""
    store_path, store = _open_store(store_path)
    chash = config_hash(to_flat_dict(cfg) | {"store": store_path})
    name = cfg.run.name or f"train-{chash}"
    client = mlflow_client()
    run_tags = {**(lineage or lineage_tags(store, store_path)), tags.CONFIG_HASH: chash, **(extra_tags or {})}
    run, existed = _open_run(client, cfg, run_key or name, name, run_tags, parent_run_id)
    if not existed:
        client.log_inputs(
            run.info.run_id, datasets=store_datasets(store, store_path, {"train": "training", "val": "validation"})
        )
    return OpenedRun(run, existed, name, store_path, store)


def train(
    store_path: str,
    cfg: TrainConfig,
    *,
    run_key: str | None = None,
    parent_run_id: str | None = None,
    callbacks: list[Any] | None = None,
    lineage: dict[str, str] | None = None,
    view: EpochView | None = None,
    check_first: bool = True,
) -> TrainResult:
    """Train (or resume) one model and log it to MLflow; returns the run id and the logged model URI.

    Re-running with the same `run.name` resumes the Ray run from its last checkpoint and continues the
    same MLflow run; a finished run is returned as is (nothing retrained, no new MLflow run).
    `lineage`: tags from `lineage_tags`, when the caller runs elsewhere than the project directory
    (a Tune trial's working directory is its trial folder: no git, no dvc.lock there).
    `view`: the terminal's progress view (one line per epoch, read back from MLflow while Ray trains).
    `check_first`: `preflight` before anything starts (a Tune trial's driver leaves it to the search's).
    """
    check_tracking(tracking_uri())
    if check_first:  # before any MLflow run or Ray: what cannot work fails in seconds
        preflight(cfg)
    opened = open_training_run(store_path, cfg, run_key, parent_run_id, lineage)
    run, existed, name, store_path, store = opened.run, opened.existed, opened.name, opened.store_path, opened.store
    client = mlflow_client()
    run_id = run.info.run_id
    t = run.data.tags
    if existed and run.info.status == "FINISHED" and t.get(tags.MODEL_URI):
        return TrainResult(run_id, name, float(t[tags.BEST_VAL_DICE]), int(t[tags.BEST_EPOCH]), t[tags.MODEL_URI], True)
    if existed:
        client.update_run(run_id, status="RUNNING")
    stats = norm_stats(store, store.cases_in("train"), cfg.data.window, cfg.data.norm_sample_slices, cfg.train.seed)
    spec = spec_for(cfg, store.size, *stats)
    loop_config = dataclasses.replace(_loop_config(cfg, store, store_path, spec, run_id), **_fault_injection(cfg, name))
    first = len(client.get_metric_history(run_id, "val_dice")) if existed else 0
    try:
        with watch_run(view, client, run_id, first, cfg.train.epochs, name):
            result = _fit(cfg, name, loop_config, callbacks)
    except KeyboardInterrupt:  # Ctrl-C: the run is over, say so in MLflow rather than leave it RUNNING
        client.set_terminated(run_id, "KILLED")
        raise
    except Exception as e:
        client.set_terminated(run_id, "FAILED")
        raise TrainError(f"training run {name} failed: {root_cause(e)}") from e
    return _finish(client, run_id, name, result, spec, store, cfg)


def log_best_model(
    client, run_id: str, best: dict[str, Any], spec: ModelSpec, store: SliceStore, cfg: TrainConfig
) -> str:
    """Log the best weights (artifact + pyfunc flavour), the config snapshot, curves and overlay PNGs;
    returns the model URI."""
    import mlflow

    spec = replace(spec, best_epoch=int(best["epoch"]), val_dice=float(best["val_dice"]), train_run_id=run_id)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        model_dir = Path(tmp) / "model_files"
        save_local(model_dir, best["model"], spec)
        # step: MLflow links the run's metrics of that step to the LoggedModel (the epoch it was saved at)
        info = log_model(model_dir, MODEL_NAME, step=int(best["epoch"]))
        (Path(tmp) / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        mlflow.log_artifact(str(Path(tmp) / "config.json"))
        mlflow.log_dict(spec.to_dict(), "liverseg_model_meta.json")
        history = {k: client.get_metric_history(run_id, k) for k in ("train_loss", "val_loss", "val_dice")}
        curves_png({k: [(m.step, m.value) for m in v] for k, v in history.items()}, Path(tmp) / "curves.png")
        mlflow.log_artifact(str(Path(tmp) / "curves.png"), "plots")
        lm = load_local(model_dir, "cpu")
        overlay_png(lm, store, store.cases_in("val")[:4], Path(tmp) / "val_overlay.png")
        mlflow.log_artifact(str(Path(tmp) / "val_overlay.png"), "plots")
    return info.model_uri
