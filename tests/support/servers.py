"""Real servers the tests start on 127.0.0.1 and stop by PID: an MLflow tracking server, `liverseg serve`."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from support.net import free_port, wait_http

# the GenAI job runner (huey workers) is nothing liverseg uses: without it a server is 2 processes, not 10
LEAN_MLFLOW = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
RELOAD_TOKEN = "test-reload-token"  # a test's own secret, handed to the replica through its environment
WEBHOOK_HMAC = secrets.token_urlsafe(24)  # the replicas' webhook secret in tests, generated per run


@dataclass
class Server:
    proc: subprocess.Popen
    uri: str

    def stop(self) -> None:
        stop(self.proc)


def start_mlflow_server(root: Path, port: int | None = None, env: dict[str, str] | None = None) -> Server:
    """`mlflow server` over SQLite `root/srv.db` and artifacts in `root/artifacts`, one worker; returns once
    /health answers. The same root and port start it again on the same data."""
    port = port or free_port()
    log = root / f"mlflow-server-{port}.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'srv.db'}"]
    cmd += ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    root.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        proc = subprocess.Popen(
            [*cmd, "--workers", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **LEAN_MLFLOW, **(env or {})},
        )
    uri = f"http://127.0.0.1:{port}"
    wait_http(uri + "/health", proc, log, 120)
    return Server(proc, uri)


def start_serve(root: Path, model: str, env: dict[str, str], *args: str, preexec_fn=None):
    """A `liverseg serve` process on a free port; returns (proc, base URL) once /health answers.

    preexec_fn: run in the child before it starts (e.g. to lower its open-files limit)."""
    port = free_port()
    log = root / f"serve-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "liverseg.cli", "serve", "--model", model, "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LIVERSEG_LOCK_DIR": str(root), **env},
            preexec_fn=preexec_fn,
        )
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health", proc, log, 120)
    return proc, base


def stop(proc, timeout_s: float = 30) -> None:
    """Terminate a process we started, by its PID; kill it if it does not exit."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Replica:
    """A `liverseg serve` process the test started: its base URL and its log (stdout and stderr)."""

    proc: subprocess.Popen
    base: str
    log: Path

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()


def promote_champion(store_path: str, liver: bool = False) -> None:
    """Register a constant model (every voxel liver, or none) as liver-unet-candidates' challenger and
    promote it to liver-unet@champion, in the current MLFLOW_TRACKING_URI."""
    from liverseg.registry.promote import promote
    from liverseg.registry.register import register
    from support.models import constant_state, log_model_run

    run, _ = log_model_run(constant_state(liver=liver), store_path=store_path)
    register(run_id=run)
    promote(store_path, min_dice=0.0)


def serve_champion(
    store_path, root: Path, max_mb: int, upload_timeout: float, *sets: str, env: dict | None = None, preexec_fn=None
):
    """Promote a no-liver model (unless there is a champion already), start `liverseg serve` of
    liver-unet@champion on a free port; yields its Replica, stops it after. sets: more `--set` overrides
    of the serve config; env: more variables."""
    from liverseg.tracking.runs import client

    try:
        client().get_model_version_by_alias("liver-unet", "champion")
    except Exception:  # none yet
        promote_champion(store_path)
    opts = ["--max-mb", str(max_mb), "--set", f"serve.upload_timeout_s={upload_timeout}"]
    opts += [a for kv in sets for a in ("--set", kv)]
    env = {"LIVERSEG_RELOAD_TOKEN": RELOAD_TOKEN, **(env or {})}
    proc, base = start_serve(root, "models:/liver-unet@champion", env, *opts, preexec_fn=preexec_fn)
    yield Replica(proc, base, root / f"serve-{base.rsplit(':', 1)[1]}.log")
    stop(proc)
