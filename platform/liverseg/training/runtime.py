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
from liverseg.tracking.runs import dvc_hash, git_commit, store_digest


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
        tags.GIT_COMMIT: commit,
        tags.MLFLOW_GIT_COMMIT: commit,
        tags.DVC_STORE_MD5: dvc_hash(store_path) if "://" not in store_path else "remote",
        tags.STORE_PATH: store_path,
        tags.STORE_DIGEST: digest,
        tags.FORMAT_VERSION: str(FORMAT_VERSION),
        tags.RAY_VERSION: ray.__version__,
        tags.TORCH_VERSION: torch.__version__,
    }
