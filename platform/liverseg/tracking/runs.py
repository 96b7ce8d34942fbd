"""MLflow runs: the tracking URI, the client with bounded retries, fail-fast reachability, failures that say
what failed, who acts, run lookup by key, lineage (git commit, DVC hash, store digest), the store's splits
as dataset inputs, system metrics.

MLflow is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from liverseg.core import env
from liverseg.core.errors import AuthError, LiversegError, PermissionRefused, RegistryError, TrackingError
from liverseg.tracking.tags import RUN_KEY

# MLflow's HTTP client retries a failed request 7 times with a backoff factor of 2 and waits 120 s for an
# answer: a stopped server or database is reported after about 4 minutes. liverseg's defaults (about 3 s
# with the server down), used where the environment sets none of MLflow's own variables:
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # a restarting server or a dropped connection is retried
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # waits of 0-1 s, then 2-3 s (MLflow adds 0-1 s jitter)
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",  # per request; a 130 MB model upload through the proxy needs ~10 s
}


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (MLflow's own convention), else ./mlflow.db (SQLite)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def http_defaults() -> dict[str, str]:
    """Put liverseg's retry defaults (HTTP_DEFAULTS) into the environment where the user set none, so that
    every MLflow call of this process (and of the Ray workers it starts) uses them; returns those in force."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in HTTP_DEFAULTS}


def client(uri: str | None = None) -> Any:
    """The one place an MlflowClient is built: for `uri`, else the project's tracking URI, with bounded
    retries (`http_defaults`)."""
    from mlflow.tracking import MlflowClient

    http_defaults()
    return MlflowClient(uri or tracking_uri())


def failure(exc: BaseException, what: str) -> LiversegError:
    """A failed MLflow call about `what` (a run, a model version) as one line saying what failed: absent
    (RegistryError), login refused (AuthError, 401), permission refused (PermissionRefused, 403), or the
    server unreachable or failing (TrackingError), naming the tracking URI and the user."""
    uri, user = tracking_uri(), os.environ.get("MLFLOW_TRACKING_USERNAME")
    who = f"user {user}" if user else "an anonymous request (MLFLOW_TRACKING_USERNAME is not set)"
    network = _network_cause(exc)
    status = _status(exc)
    if network:
        retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
        return TrackingError(
            f"{what}: tracking server {uri} {network} (MLFLOW_HTTP_REQUEST_MAX_RETRIES={retries} retries; "
            "raise it or MLFLOW_HTTP_REQUEST_TIMEOUT to insist longer)"
        )
    if status == 401:
        return AuthError(
            f"{what}: {uri} refused the login of {who} (401): check MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD"
        )
    if status == 403:
        return PermissionRefused(f"{what}: {uri} refused {who} (403): no permission for it")
    if not_found(exc):
        return RegistryError(f"{what}: not found in {uri}")
    if status and status >= 500:
        return TrackingError(f"{what}: tracking server {uri} failed ({status}): {_first_line(exc)}")
    return TrackingError(f"{what}: {uri}: {_first_line(exc)}")


def not_found(exc: BaseException) -> bool:
    """An MLflow answer meaning "no such run, model, version or alias" (404, or 400 for an unknown alias)."""
    code = str(getattr(exc, "error_code", ""))
    text = str(exc)
    if getattr(getattr(exc, "response", None), "status_code", None) == 404:
        return True
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "ENDPOINT_NOT_FOUND") or (
        code == "INVALID_PARAMETER_VALUE" and "not found" in text and ("alias" in text or "version" in text.lower())
    )


def _status(exc: BaseException) -> int | None:
    """The HTTP status of a failed MLflow call (its error code's, or the response's), None when unknown."""
    response = getattr(exc, "response", None)
    if getattr(response, "status_code", None):
        return int(response.status_code)
    getter = getattr(exc, "get_http_status_code", None)
    return int(getter()) if callable(getter) else None


def _network_cause(exc: BaseException) -> str | None:
    """'is not reachable' / 'did not answer in time' / 'answered N to every try' when a transport failure
    (requests' ConnectionError, Timeout, RetryError after 5xx answers) is in the exception's chain."""
    import re

    import requests

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, requests.exceptions.RetryError):
            code = re.search(r"too many (\d+) error responses", str(exc))
            return (
                f"answered {code[1] if code else 'an error'} to every try (its database or artifact store may be down)"
            )
        if isinstance(exc, requests.exceptions.Timeout):
            return "did not answer in time"
        if isinstance(exc, requests.exceptions.ConnectionError):
            return "is not reachable"
        exc = exc.__cause__ or exc.__context__
    return None


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", "") or exc)
    return text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__


def author() -> str:
    """Who acts: the tracking server login (MLFLOW_TRACKING_USERNAME, forwarded to Ray workers) when set,
    else the OS login. Runs carry it as `mlflow.user` (the UI's User column); promotions record it."""
    import getpass

    return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()


@dataclass(frozen=True)
class Login:
    """Who the tracking server says the caller is."""

    name: str
    is_admin: bool = False
    verified: bool = False  # the server checked the password; False: a local store or a server without auth


def login(uri: str | None = None, timeout_s: float = 10.0) -> Login:
    """The caller as the tracking server sees them: MLflow basic-auth's `GET /api/2.0/mlflow/users/current`
    with MLFLOW_TRACKING_USERNAME/PASSWORD (or MLFLOW_TRACKING_TOKEN). A refused login is a TrackingError;
    a local store, or a server without the auth app, gives the unverified `author()`."""
    import requests

    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return Login(author())
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    try:
        res = requests.get(
            uri.rstrip("/") + "/api/2.0/mlflow/users/current",
            auth=(user, password) if user and password else None,
            headers={"Authorization": f"Bearer {token}"} if token else None,
            timeout=timeout_s,
        )
    except requests.RequestException as e:
        raise TrackingError(f"MLflow tracking server {uri} is not reachable: {type(e).__name__}") from None
    if res.status_code in (401, 403):
        raise TrackingError(f"MLflow tracking server {uri} refused the login {user or '(none)'}: wrong password?")
    if res.status_code == 404:  # no basic-auth app: anyone may write any name
        return Login(author())
    if res.status_code != 200:
        raise TrackingError(f"MLflow tracking server {uri}: users/current answered {res.status_code}")
    body = res.json().get("user", {})
    return Login(str(body.get("username")), bool(body.get("is_admin")), True)


def check_tracking(uri: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds, before any training, when the tracking store is unusable.

    For SQLite this also creates the schema once, so that parallel workers do not race on it.
    """
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
        except Exception as e:
            raise TrackingError(f"MLflow tracking server {uri} is not reachable: {type(e).__name__}") from None
        return
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as e:
        raise TrackingError(f"MLflow tracking store {uri} is not usable: {type(e).__name__}: {e}") from None


def ui_url(run_id: str, experiment_id: str, uri: str | None = None) -> str | None:
    """The run's page in the MLflow UI of a tracking server (None for a local store: `mlflow ui`)."""
    from urllib.parse import urlsplit

    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    parts = urlsplit(uri.rstrip("/"))  # a password written into the URI stays out of the link
    base = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created by a concurrent process meanwhile
        return client.get_experiment_by_name(name).experiment_id


def find_run(client: Any, exp_id: str, key: str) -> Any | None:
    """The newest run tagged with RUN_KEY == key, or None."""
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`{RUN_KEY}` = '{key}'", max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0] if runs else None


def git_commit(cwd: str | Path | None = None) -> str:
    """HEAD commit, with '-dirty' when tracked files changed; outside git (a container image) the
    commit the image was built from (`env.GIT_COMMIT`), else 'unknown'."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno"], cwd=cwd, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return env.get(env.GIT_COMMIT) or "unknown"


def dvc_hash(path: str | Path, lock: str | Path = "dvc.lock") -> str:
    """The md5 DVC recorded for `path` as a stage output in dvc.lock (or 'untracked')."""
    lock = Path(lock)
    if not lock.exists():
        return "untracked"
    target = os.path.normpath(os.path.relpath(Path(path).resolve(), lock.resolve().parent))
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if os.path.normpath(out.get("path", "")) == target:
                return str(out.get("md5", "untracked"))
    return "untracked"


def store_digest(store_attrs: dict[str, Any], case_attrs: dict[str, dict[str, Any]]) -> str:
    """Content hash of a slice store: size, splits and every case's array hashes."""
    body = {
        "size": store_attrs["size"],
        "splits": store_attrs["splits"],
        "cases": {c: [a["image_sha256"], a["mask_sha256"]] for c, a in sorted(case_attrs.items())},
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def store_datasets(store: Any, store_path: str, contexts: dict[str, str]) -> list[Any]:
    """A slice store's splits as MLflow dataset inputs: the runs table's Datasets column, the run page's
    inputs, and a digest to compare runs by.

    One per split in `contexts` ({split: context}, e.g. {"train": "training"}): named
    `<store>/<split>`; digest from the split's cases and their stored-array hashes (the same data gives
    the same digest on any machine, whatever the path); source the store's URI; schema the arrays,
    image (-1, H, W) int16 HU and mask (-1, H, W) uint8; profile the case and slice counts.
    """
    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from liverseg.data.published import store_name

    h, w = store.size
    schema = TensorDatasetSchema(
        Schema([TensorSpec(np.dtype(np.int16), (-1, h, w), "image")]),
        Schema([TensorSpec(np.dtype(np.uint8), (-1, h, w), "mask")]),
    )
    scheme = store_path.split("://")[0] if "://" in store_path else "local"
    out = []
    for split, context in contexts.items():
        cases = store.cases_in(split)
        arrays = [(c, store.case_attrs(c)["image_sha256"], store.case_attrs(c)["mask_sha256"]) for c in cases]
        digest = hashlib.sha256(json.dumps([list(store.size), arrays]).encode()).hexdigest()[:16]  # MLflow: <= 36
        profile = {"cases": len(cases), "slices": sum(store.num_slices(c) for c in cases)}
        ds = Dataset(
            name=f"{store_name(store_path)}/{split}",
            digest=digest,
            source_type=scheme,
            source=json.dumps({"uri": store_path}),
            schema=json.dumps(schema.to_dict()),
            profile=json.dumps(profile),
        )
        out.append(DatasetInput(ds, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return out


def start_system_metrics(uri: str | None, run_id: str | None, resume: bool = False, interval_s: float = 5.0):
    """MLflow's system metrics (CPU, memory, disk, network; GPU when pynvml sees one) for `run_id`, sampled
    by a thread of this process every `interval_s`; returns the monitor (call .finish()) or None."""
    if not (uri and run_id):
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=resume, tracking_uri=uri)
    monitor.start()
    return monitor


def config_hash(flat: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]
