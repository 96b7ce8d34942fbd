"""Train: a ResNet-50 U-Net on Ray Train from the slice store, one MLflow run per training.

The driver opens (or re-opens, on resume) the MLflow run, computes the training split's
normalisation statistics, shares the cases over the workers and starts a TorchTrainer; rank 0 logs
per-epoch metrics; afterwards the driver logs the best model as a pyfunc with its preprocessing.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from liverseg.artifact import ModelSpec, load_local, log_model, save_local, spec_for
from liverseg.config import TrainConfig, to_flat_dict
from liverseg.console import EpochView, root_cause, watch_run
from liverseg.data import assign_cases, norm_stats
from liverseg.errors import ModelError, TrainError
from liverseg.plots import curves_png, overlay_png
from liverseg.store import FORMAT_VERSION, SliceStore
from liverseg.tracking import (
    RUN_KEY,
    author,
    check_tracking,
    config_hash,
    dvc_hash,
    experiment_id,
    find_run,
    git_commit,
    store_datasets,
    store_digest,
    tracking_uri,
)
from liverseg.tracking import client as mlflow_client
from liverseg.train_loop import BEST_FILE, worker_loop

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


def storage_path(cfg: TrainConfig) -> str:
    """Ray storage must be absolute or a URI; a relative path is taken from the working directory."""
    p = cfg.run.storage_path or "ray_results"
    return p if "://" in p else str(Path(p).expanduser().resolve())


# The submitter's services and identity: a shared cluster's workers were started with other variables
# (or none), so these travel with the job (Ray's runtime_env) and each trial logs as its author.
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
)


def preflight(cfg: TrainConfig) -> None:
    """What Ray would retry for minutes, checked in seconds before it starts: ImageNet weights (fetched
    once, or cached) and, for a local Ray, the GPUs `scaling.use_gpu` asks for. A remote cluster may
    autoscale GPU nodes in: there the bounded worker-group start (run.worker_start_timeout_s x
    run.start_retries) ends a search that cannot be placed."""
    if cfg.model.encoder_weights == "imagenet":
        from liverseg.model import build_model

        try:
            build_model(cfg.model.encoder, "imagenet", cfg.model.in_channels, tuple(cfg.model.decoder_channels))
        except ModelError:
            raise ModelError(
                f"model.encoder_weights=imagenet: ImageNet weights of {cfg.model.encoder} unavailable offline: "
                "use encoder_weights=none or a local file"
            ) from None
    if cfg.scaling.use_gpu and not (cfg.run.ray_address or os.environ.get("RAY_ADDRESS")):
        have = torch.cuda.device_count()
        if have < cfg.scaling.num_workers:
            raise TrainError(
                f"no GPU in the Ray cluster ({have} of {cfg.scaling.num_workers} needed): set scaling.use_gpu=false"
            )


def ensure_ray(address: str | None) -> None:
    """Connect to `address` (or RAY_ADDRESS) handing the job FORWARDED_ENV, else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env})
    else:
        ray.init(log_to_driver=True)  # local workers inherit this process's environment


def lineage_tags(store: SliceStore, store_path: str) -> dict[str, str]:
    import ray

    commit = git_commit()
    digest = store_digest(store.attrs, {c: store.case_attrs(c) for c in store.cases})
    return {
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "dvc_store_md5": dvc_hash(store_path) if "://" not in store_path else "remote",
        "store_path": store_path,
        "store_digest": digest,
        "format_version": str(FORMAT_VERSION),
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
    }


def _open_run(client, cfg: TrainConfig, key: str, name: str, tags: dict[str, str], parent_run_id: str | None):
    exp = experiment_id(client, cfg.run.experiment)
    existing = find_run(client, exp, key)
    if existing is not None:
        return existing, True
    all_tags = {RUN_KEY: key, "mlflow.user": author(), **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp, run_name=name, tags=all_tags)
    flat = to_flat_dict(cfg)
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in flat.items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return run, False


FAULT_ENV = "LIVERSEG_TEST_FAIL_AT_EPOCH"  # tests only: rank 0 crashes once, mid-way through that epoch


def _open_store(store_path: str) -> tuple[str, SliceStore]:
    """The store (absolute when local: Ray workers run in other directories); needs train and val cases."""
    if "://" not in store_path:
        store_path = str(Path(store_path).resolve())
    store = SliceStore(store_path)
    n_train, n_val = len(store.cases_in("train")), len(store.cases_in("val"))
    if not n_train or not n_val:
        raise TrainError(f"{store_path}: needs train and val cases, has {n_train} and {n_val}")
    return store_path, store


def _fault_injection(cfg: TrainConfig, name: str) -> dict[str, Any]:
    """The tests' crash: an epoch from `LIVERSEG_TEST_FAIL_AT_EPOCH` and a marker file that makes it happen once."""
    epoch, root = os.environ.get(FAULT_ENV), storage_path(cfg)
    if not epoch or "://" in root:
        return {}
    return {"fail_at_epoch": int(epoch), "fault_marker": f"{root}/{name}/.fault-injected"}


def _loop_config(cfg: TrainConfig, store: SliceStore, store_path: str, spec: ModelSpec, run_id: str) -> dict:
    """What every worker gets: config, spec, its share of cases (balanced by slices), where to log."""
    workers = cfg.scaling.num_workers
    train_cases, val_cases = store.cases_in("train"), store.cases_in("val")
    slices = {c: store.num_slices(c) for c in train_cases}
    return {
        "cfg": cfg.model_dump(mode="json"),
        "store": store_path,
        "spec": spec.to_dict(),
        "train_shares": assign_cases(slices, workers),
        "train_slices": sum(slices.values()),
        "val_cases": val_cases,
        "val_shares": assign_cases({c: store.num_slices(c) for c in val_cases}, workers),
        "tracking_uri": tracking_uri(),
        "run_id": run_id,
    }


def _fit(cfg: TrainConfig, name: str, loop_config: dict[str, Any], callbacks: list[Any] | None):
    """Run `worker_loop` on Ray Train (resuming the named run from its checkpoint); Ray's Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray(cfg.run.ray_address)
    os.environ[WORKER_START_TIMEOUT_ENV] = str(cfg.run.worker_start_timeout_s)  # Train passes it to its controller
    sc = cfg.scaling
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
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
    client.log_metric(run_id, "best_val_dice", float(best["val_dice"]), step=int(best["epoch"]))
    model_uri = log_best_model(client, run_id, best, spec, store, cfg)
    client.set_tag(run_id, "best_val_dice", f"{best['val_dice']:.6f}")
    client.set_tag(run_id, "best_epoch", str(best["epoch"]))
    client.set_tag(run_id, "model_uri", model_uri)
    client.set_terminated(run_id, "FINISHED")
    return TrainResult(run_id, name, float(best["val_dice"]), int(best["epoch"]), model_uri)


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
    store_path, store = _open_store(store_path)
    chash = config_hash(to_flat_dict(cfg) | {"store": store_path})
    name = cfg.run.name or f"train-{chash}"
    client = mlflow_client()
    tags = {**(lineage or lineage_tags(store, store_path)), "config_hash": chash}
    run, existed = _open_run(client, cfg, run_key or name, name, tags, parent_run_id)
    run_id = run.info.run_id
    if not existed:
        client.log_inputs(
            run_id, datasets=store_datasets(store, store_path, {"train": "training", "val": "validation"})
        )
    if existed and run.info.status == "FINISHED" and run.data.tags.get("model_uri"):
        t = run.data.tags
        return TrainResult(run_id, name, float(t["best_val_dice"]), int(t["best_epoch"]), t["model_uri"], True)
    if existed:
        client.update_run(run_id, status="RUNNING")
    stats = norm_stats(store, store.cases_in("train"), cfg.data.window, cfg.data.norm_sample_slices, cfg.train.seed)
    spec = spec_for(cfg, store.size, *stats)
    loop_config = _loop_config(cfg, store, store_path, spec, run_id) | _fault_injection(cfg, name)
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
