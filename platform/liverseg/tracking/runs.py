"""MLflow runs: the tracking URI, the client with bounded retries, fail-fast reachability, failures that say
what failed, who acts, run lookup by key, system metrics. What a run was made from: `provenance`.

MLflow is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liverseg.core.errors import AuthError, LiversegError, PermissionRefused, RegistryError, TrackingError
from liverseg.tracking.tags import RUN_KEY

# MLflow's HTTP client retries a failed request 7 times with a backoff factor of 2 and waits 120 s for an
# answer: a stopped server or database is reported after about 4 minutes. liverseg's defaults (about 3 s
# with the server down), used where the environment sets none of MLflow's own variables:
MLFLOW_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # a restarting server or a dropped connection is retried
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # waits of 0-1 s, then 2-3 s (MLflow adds 0-1 s jitter)
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",  # per request; a 130 MB model upload through the proxy needs ~10 s
    # and no "View run ... at" lines on stdout when a run ends: stdout is liverseg's (`jobs --json`, results)
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (MLflow's own convention), else ./mlflow.db (SQLite)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def mlflow_defaults() -> dict[str, str]:
    """Put liverseg's MLflow client defaults (MLFLOW_DEFAULTS: bounded retries, a quiet stdout) into the
    environment where the user set none, so that every MLflow call of this process (and of the Ray workers
    it starts) uses them; returns those in force."""
    for key, value in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in MLFLOW_DEFAULTS}


def client(uri: str | None = None) -> Any:
    """The one place an MlflowClient is built: for `uri`, else the project's tracking URI, with bounded
    retries (`mlflow_defaults`)."""
    from mlflow.tracking import MlflowClient

    mlflow_defaults()
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


def start_system_metrics(uri: str | None, run_id: str | None, resume: bool = False, interval_s: float = 5.0):
    """MLflow's system metrics (CPU, memory, disk, network; GPU when pynvml sees one) for `run_id`, sampled
    by a thread of this process every `interval_s`; returns the monitor (call .finish()) or None."""
    if not (uri and run_id):
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=resume, tracking_uri=uri)
    monitor.start()
    return monitor
