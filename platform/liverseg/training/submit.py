"""`liverseg tune|train --submit`: the command as a Ray job on a shared cluster (Ray's Jobs SDK); its driver
runs there, not on the submitter's machine, which may close.

What happens on the submitter's machine: the login is checked by the tracking server (the job's owner is
who the server says, not a typed name); config, overrides and lineage (git commit, DVC hash, store digest)
are read where the checkout is; the job's MLflow run (a search's parent run, a training run) is opened,
SCHEDULED and tagged with the job. Then the job: entrypoint `python -m liverseg.training.job_main` (the
cluster's Python), its spec in the job's metadata (no secret in it), the submitter's services and
credentials sealed in its runtime_env (see credentials). Results land in MLflow, never in the checkout.
"""

from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from liverseg.core.config import TrainConfig, TuneConfig
from liverseg.core.errors import ConfigError, TrainError, one_line
from liverseg.tracking import tags
from liverseg.tracking.runs import Login, login, tracking_uri, ui_url
from liverseg.tracking.runs import client as mlflow_client
from liverseg.training.credentials import forwarded, redact
from liverseg.training.runtime import cluster_address, job_runtime_env

ENTRYPOINT = "python -m liverseg.training.job_main"
SPEC_KEY, OWNER_KEY, KIND_KEY = "liverseg.spec", "liverseg.owner", "liverseg.kind"  # Ray job metadata keys
STOP_WAIT_S = "60"  # Ray's SIGTERM-to-SIGKILL wait for a stopped job (3 s): time to mark runs KILLED
LOOPBACK = ("127.", "localhost", "::1", "[::1]")


@dataclass
class JobSpec:
    """What a submitted job runs, as its driver reads it back from the job's metadata."""

    kind: str  # tune | train
    job_id: str
    owner: str  # the tracking login that submitted it
    owner_verified: bool  # the tracking server checked that login's password
    store: str  # absolute path (a cluster on this machine) or URL
    config: dict[str, Any]  # the resolved TuneConfig or TrainConfig
    lineage: dict[str, str]  # read in the submitter's checkout
    run_id: str  # the job's MLflow run: a search's parent run, or the training run
    experiment_id: str
    resume: bool = False
    resumes: str | None = None  # the job this one continues

    def metadata(self) -> dict[str, str]:
        return {SPEC_KEY: json.dumps(asdict(self)), OWNER_KEY: self.owner, KIND_KEY: self.kind}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None) -> JobSpec | None:
        """The spec of a liverseg job, None for any other Ray job."""
        raw = (metadata or {}).get(SPEC_KEY)
        if not raw:
            return None
        d = json.loads(raw)
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    @property
    def place(self) -> str:
        """Where Ray keeps the search's state (and a training's checkpoints): storage path / name."""
        run = self.config.get("run", {})
        name = self.config.get("tune", {}).get("name") if self.kind == "tune" else run.get("name")
        return f"{str(run.get('storage_path') or '').rstrip('/')}/{name}"

    @property
    def trials(self) -> int:
        from liverseg.training.search import trial_count

        if self.kind != "tune":
            return 1
        return trial_count(int(self.config.get("tune", {}).get("num_samples", 1)), self.config.get("space", {}))


@dataclass(frozen=True)
class Submitted:
    spec: JobSpec
    url: str | None  # the MLflow UI page of the job's run (a tracking server only)


@contextmanager
def _address_env(address: str):
    """Ray's Jobs SDK lets RAY_ADDRESS win over the address it is given: hand it ours for the call."""
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    os.environ["RAY_ADDRESS"] = address
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def jobs_client(address: str | None):
    """Ray's JobSubmissionClient for the cluster at `address` (its dashboard http://HOST:8265, its GCS
    HOST:6379 or ray://HOST:10001), with the Ray token when token auth is on; one-line errors."""
    import logging

    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # its INFO chatter
    if not address:
        raise ConfigError("no Ray cluster: set RAY_ADDRESS (its dashboard http://HOST:8265), see docs/cluster.md")
    try:
        with _address_env(address):
            return JobSubmissionClient(address)
    except Exception as e:
        raise TrainError(f"Ray cluster {address}: {redact(one_line(e))}") from None


def is_local(address: str) -> bool:
    """The cluster runs on this machine (it can read this machine's paths)."""
    host = urlparse(address if "://" in address else f"tcp://{address}").hostname or ""
    return host.startswith(LOOPBACK) or host == "::1"


def _placed(cfg: TrainConfig, store: str, address: str) -> tuple[TrainConfig, str]:
    """The config and store as the cluster must see them: absolute local paths only for a cluster on this
    machine, else URLs; the job connects to the cluster it runs in (run.ray_address dropped)."""
    cfg = cfg.model_copy(deep=True)
    local = is_local(address)
    where = {"--store": store, "run.storage_path": cfg.run.storage_path or "ray_results", "tracking": tracking_uri()}
    for what, value in where.items():
        if "://" not in value or value.startswith("sqlite:"):
            if not local:
                raise ConfigError(
                    f"{what} {value}: on this machine only, the cluster at {address} cannot read it: use "
                    "s3://... (liverseg publish) for stores and storage, a tracking server for MLflow"
                )
    if "://" not in store:
        store = str(Path(store).resolve())
    if "://" not in (cfg.run.storage_path or ""):
        cfg.run.storage_path = str(Path(cfg.run.storage_path or "ray_results").expanduser().resolve())
    cfg.run.ray_address = None
    return cfg, store


def _job_tags(job_id: str, who: Login, overrides: list[str], source: str) -> dict[str, str]:
    return {
        tags.JOB_ID: job_id,
        tags.JOB_OWNER: who.name,
        tags.JOB_OVERRIDES: json.dumps(overrides),
        tags.JOB_CONFIG_SOURCE: source,
        tags.JOB_STATE: "submitted",
    }


def _open_run(kind: str, cfg, store: str, resume: bool, lineage: dict, job_tags: dict) -> tuple[str, str]:
    """Open the job's MLflow run on this machine, SCHEDULED until its driver starts; (run id, experiment id)."""
    client = mlflow_client()
    if kind == "tune":
        from liverseg.training.tune import open_search_run

        rid = open_search_run(client, cfg, resume, lineage, job_tags)
    else:
        from liverseg.training.train import open_training_run

        opened = open_training_run(store, cfg, lineage=lineage, extra_tags=job_tags)
        rid = opened.run.info.run_id
        cfg.run.name = opened.name  # the driver finds this run by its name
        for k, v in job_tags.items():  # a run found again (a resumed training) gets this job's tags
            client.set_tag(rid, k, v)
    run = client.get_run(rid)
    if run.info.status != "FINISHED":
        client.update_run(rid, status="SCHEDULED")
    return rid, run.info.experiment_id


def close_run(run_id: str, status: str) -> bool:
    """End a job's MLflow run that is still open (SCHEDULED or RUNNING) as `status`, and a search's open
    trial runs with it; True if it was open."""
    client = mlflow_client()
    run = client.get_run(run_id)
    if run.info.status not in ("SCHEDULED", "RUNNING"):
        return False
    children = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`{tags.MLFLOW_PARENT_RUN_ID}` = '{run_id}' and attributes.status = 'RUNNING'",
    )
    for r in [*children, run]:
        client.set_terminated(r.info.run_id, status)
    return True


def submit(kind: str, store: str, cfg: TrainConfig, overrides: list[str], source: str, resume: bool) -> Submitted:
    """Submit `liverseg tune|train` with `cfg` as a Ray job to the cluster of run.ray_address / RAY_ADDRESS."""
    from liverseg.data.store import SliceStore
    from liverseg.training.runtime import lineage_tags

    address = cluster_address(cfg)
    if not address:
        raise ConfigError(
            "--submit: no Ray cluster: set RAY_ADDRESS (its dashboard http://HOST:8265) or run.ray_address"
        )
    client = jobs_client(address)
    who = login()
    cfg, store = _placed(cfg, store, address)
    if kind == "tune":
        from liverseg.training.search import build_space

        build_space(cfg.space)  # a bad space fails here, not on the cluster
        check_place_free(client, kind, f"{cfg.run.storage_path.rstrip('/')}/{cfg.tune.name}")
    opened = SliceStore(store)
    store = opened.pinned_url  # a published store: the version current now, whatever is published meanwhile
    lineage = lineage_tags(opened, store)  # in the checkout: git commit, dvc.lock
    job_id = f"{kind}-{secrets.token_hex(4)}"
    run_id, exp_id = _open_run(kind, cfg, store, resume, lineage, _job_tags(job_id, who, overrides, source))
    model = TuneConfig if kind == "tune" else TrainConfig
    config = model.model_validate(cfg.model_dump()).model_dump(mode="json")
    spec = JobSpec(kind, job_id, who.name, who.verified, store, config, lineage, run_id, exp_id, resume)
    return send(client, spec)


def check_place_free(client, kind: str, place: str) -> None:
    """Two live searches in one Tune folder would overwrite each other's state: refused in one line."""
    for job in client.list_jobs():
        other = JobSpec.from_metadata(job.metadata)
        if other and other.kind == kind and str(job.status) in ("PENDING", "RUNNING") and other.place == place:
            what = "tune.name" if kind == "tune" else "run.name"
            raise TrainError(
                f"{place}: job {other.job_id} of {other.owner} runs there now (Ray keeps its state there): "
                f"choose another {what} or run.storage_path, or wait for it"
            )


def send(client, spec: JobSpec) -> Submitted:
    """Hand `spec` to Ray as a job: credentials sealed, the stop wait long enough to close MLflow runs."""
    values = {**forwarded(), "MLFLOW_TRACKING_URI": tracking_uri()}  # a default SQLite path made absolute
    runtime_env = job_runtime_env(values)
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "RAY_JOB_STOP_WAIT_TIME_S": STOP_WAIT_S}
    try:
        client.submit_job(
            entrypoint=ENTRYPOINT, submission_id=spec.job_id, runtime_env=runtime_env, metadata=spec.metadata()
        )
    except Exception as e:
        close_run(spec.run_id, "FAILED")
        raise TrainError(f"job {spec.job_id} not submitted: {redact(one_line(e))}") from None
    return Submitted(spec, ui_url(spec.run_id, spec.experiment_id))
