"""What a cluster job carries of its submitter: the services and identity it needs, sealed so that only the
Ray cluster's token opens them, and kept out of every line the job's driver writes.

Ray has no secret store: a job's `runtime_env` is returned by the Jobs API to every caller (`ray job
list`, the dashboard) and written to the runtime-env agent's log on the head. So liverseg puts one
variable there, `LIVERSEG_JOB_SEALED_ENV`: the forwarded variables as JSON, encrypted with Fernet
(AES-128-CBC + HMAC-SHA256) under a key derived (HKDF-SHA256, a fresh salt per job) from the cluster's Ray
token. Whoever holds that token (every submitter, every node) can open it, and could run code beside the
job anyway; nobody else can (a job list, the dashboard, a shipped log). Every worker process of the job
opens it when it starts (`worker_setup`, Ray's `worker_process_setup_hook`), the driver first thing.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from liverseg.core import env
from liverseg.core.errors import TrainError

# The submitter's services and identity: a shared cluster's workers were started with other variables
# (or none), so these travel with the job and each trial logs to MLflow as its author.
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
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_SEAL_VERSION = "v1"
_INFO = b"liverseg job environment v1"
_MASK = "***"


def forwarded(environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in FORWARDED_ENV if environ.get(k)}


def ray_token() -> str | None:
    """The Ray cluster token this process would authenticate with (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token), or None."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    if not loader.has_token(ignore_auth_mode=True):
        return None
    return loader.get_raw_token(ignore_auth_mode=True) or None


def _fernet(token: str, salt: bytes):
    from cryptography.fernet import Fernet
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO).derive(token.encode())
    return Fernet(base64.urlsafe_b64encode(key))


def seal(values: dict[str, str], token: str) -> str:
    """`values` as an opaque string only `token` opens: 'v1.<salt>.<Fernet token>'."""
    salt = os.urandom(16)
    body = _fernet(token, salt).encrypt(json.dumps(values).encode()).decode()
    return f"{_SEAL_VERSION}.{base64.urlsafe_b64encode(salt).decode()}.{body}"


def unseal(sealed: str, token: str | None) -> dict[str, str]:
    from cryptography.fernet import InvalidToken

    try:
        version, salt, body = sealed.split(".", 2)
        if version != _SEAL_VERSION or not token:
            raise ValueError(version)
        return json.loads(_fernet(token, base64.urlsafe_b64decode(salt)).decrypt(body.encode()))
    except (ValueError, InvalidToken):
        raise TrainError(
            "the job's sealed credentials do not open with this cluster's Ray token (submitted with another "
            "token, or the cluster runs without token auth)"
        ) from None


def job_env_vars(values: dict[str, str], token: str | None) -> dict[str, str]:
    """The `env_vars` of a job's runtime_env carrying `values`: sealed under the cluster token. Without a
    token, only values that are no secret may travel (in clear); secrets are refused in one line."""
    if token:
        return {env.JOB_SEALED_ENV: seal(values, token)}
    secrets = sorted(k for k in values if k in SECRET_ENV)
    if secrets:
        raise TrainError(
            f"no Ray cluster token here (RAY_AUTH_MODE=token with RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH): "
            f"{', '.join(secrets)} would travel in clear to every user of the cluster; see docs/cluster.md"
        )
    return dict(values)


def open_job_env() -> None:
    """In a job's process: the sealed variables into os.environ (no-op outside a job)."""
    sealed = env.get(env.JOB_SEALED_ENV)
    if sealed:
        os.environ.update(unseal(sealed, ray_token()))


def worker_setup() -> None:
    """Ray's worker_process_setup_hook for liverseg's jobs: open the sealed variables, and pin RAY_ADDRESS
    to the cluster this worker belongs to. Ray Train's PlacementGroupCleaner asks the State API for its
    controller without an address; "auto" scans the machine's Ray instances and fails with 'Found
    multiple active Ray instances' when another one runs beside (a local search beside a team cluster)."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    open_job_env()


def secret_values() -> list[str]:
    """The secret values in this process's environment, longest first (a value inside another is masked
    with it)."""
    return sorted({os.environ[k] for k in SECRET_ENV if len(os.environ.get(k) or "") >= 4}, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    for s in secret_values() if secrets is None else secrets:
        text = text.replace(s, _MASK)
    return text


@contextmanager
def redacted_output() -> Iterator[None]:
    """File descriptors 1 and 2 of this process (and of the processes it starts) through a filter that
    masks every secret value of the environment, line by line, into what fd 1 was (a job's log)."""
    secrets = [s.encode() for s in secret_values()]
    if not secrets:
        yield
        return
    read_fd, write_fd = os.pipe()
    saved = os.dup(1), os.dup(2)

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as src, os.fdopen(os.dup(saved[0]), "wb", buffering=0) as dst:
            for line in src:
                for s in secrets:
                    line = line.replace(s, _MASK.encode())
                dst.write(line)

    thread = threading.Thread(target=pump, name="liverseg-redact", daemon=True)
    thread.start()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        thread.join(5)  # EOF once every writer is gone (a straggling child may hold the pipe: not waited for)
