"""Where a run runs: a local Ray or the cluster at RAY_ADDRESS (with the submitter's services and identity
handed to the job), its storage (absolute path or URI), checks that fail in seconds what Ray would
retry for minutes, and the lineage tags read in the project directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from liverseg.core.config import TrainConfig
from liverseg.core.errors import ModelError, TrainError
from liverseg.data.store import FORMAT_VERSION, SliceStore
from liverseg.tracking import tags
from liverseg.tracking.provenance import dvc_hash, git_commit, store_digest
from liverseg.training.credentials import forwarded, job_env_vars, ray_token

SETUP_HOOK = "liverseg.training.credentials.worker_setup"  # Ray imports it in every worker of the job
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted job's driver


def storage_path(cfg: TrainConfig) -> str:
    """Ray storage must be absolute or a URI; a relative path is taken from the working directory."""
    p = cfg.run.storage_path or "ray_results"
    return p if "://" in p else str(Path(p).expanduser().resolve())


def cluster_address(cfg: TrainConfig) -> str | None:
    """The Ray cluster a run goes to (run.ray_address, else RAY_ADDRESS, which Ray sets for a submitted
    job's driver); None: a local Ray this command starts."""
    return cfg.run.ray_address or os.environ.get("RAY_ADDRESS") or None


def workers_need(cfg: TrainConfig) -> dict[str, float]:
    """What a run's Ray Train workers take together: {"CPU": n, "GPU": n} (GPU only with use_gpu)."""
    workers = cfg.scaling.num_workers
    need = {"CPU": workers * cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        need["GPU"] = float(workers)
    return need


def preflight(cfg: TrainConfig) -> None:
    """What Ray would retry for minutes, checked in seconds before it starts: ImageNet weights (fetched
    once, or cached) and, for a local Ray, the GPUs `scaling.use_gpu` asks for. A remote cluster may
    autoscale GPU nodes in: there the bounded worker-group start (run.worker_start_timeout_s x
    run.start_retries) ends a search that cannot be placed."""
    if cfg.model.encoder_weights == "imagenet":
        from liverseg.model.network import build_model

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


def job_runtime_env(values: dict[str, str]) -> dict:
    """The runtime_env of liverseg's Ray jobs: the worker setup hook (pins each worker to its own cluster,
    opens the sealed variables) and `values` sealed under the cluster's token (see credentials)."""
    env_vars = job_env_vars(values, ray_token()) if values else {}
    return {"worker_process_setup_hook": SETUP_HOOK, **({"env_vars": env_vars} if env_vars else {})}


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM (what `ray job stop` sends a job's driver) ends the run as Ctrl-C does: its MLflow runs
    KILLED, its trials and workers shut down (see `tune._fit`, `train.train`)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def in_submitted_job() -> bool:
    """This process is the driver of a Ray job submitted through the Jobs API (its runtime_env is set)."""
    return bool(os.environ.get(JOB_CONFIG_ENV))


def ensure_ray(address: str | None) -> None:
    """Connect to Ray: inside a submitted job, to its cluster with the job's own runtime_env; with `address`
    (or RAY_ADDRESS), to that cluster handing it this shell's FORWARDED_ENV, sealed; else a local Ray
    (its workers inherit this process's environment). Every worker runs the setup hook either way."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if in_submitted_job():
        ray.init(log_to_driver=True)  # a second runtime_env would conflict with the job's
        stop_on_sigterm()  # again: ray.init installed its own (sys.exit), which would leave runs RUNNING
    elif address:
        ray.init(address=address, log_to_driver=True, runtime_env=job_runtime_env(forwarded()))
    else:
        ray.init(log_to_driver=True, runtime_env=job_runtime_env({}))


def lineage_tags(store: SliceStore, store_path: str) -> dict[str, str]:
    import ray

    commit = git_commit()
    digest = store_digest(store.attrs, {c: store.case_attrs(c) for c in store.cases})
    return {
        tags.GIT_COMMIT: commit,
        tags.MLFLOW_GIT_COMMIT: commit,
        tags.DVC_STORE_MD5: dvc_hash(store_path) if "://" not in store_path else "remote",
        tags.STORE_PATH: store_path,
        tags.STORE_DIGEST: digest,
        tags.FORMAT_VERSION: str(FORMAT_VERSION),
        tags.RAY_VERSION: ray.__version__,
        tags.TORCH_VERSION: torch.__version__,
    }
