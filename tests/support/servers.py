"""Real servers the tests start on 127.0.0.1 and stop by PID: an MLflow tracking server, `liverseg serve`."""

from __future__ import annotations

import contextlib
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


def start_mlflow_server(
    root: Path,
    port: int | None = None,
    env: dict[str, str] | None = None,
    backend: str | None = None,
    artifacts: str | None = None,
    args: tuple[str, ...] = (),
) -> Server:
    """`mlflow server` over `backend` (default SQLite `root/srv.db`) and artifacts in `artifacts` (default
    `root/artifacts`), one worker, more `args` (e.g. `--app-name basic-auth`); returns once /health answers.
    The same root and port start it again on the same data."""
    port = port or free_port()
    log = root / f"mlflow-server-{port}.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend or f"sqlite:///{root / 'srv.db'}"]
    cmd += ["--artifacts-destination", artifacts or str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    root.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        proc = subprocess.Popen(
            [*cmd, "--workers", "1", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **LEAN_MLFLOW, **(env or {})},
        )
    uri = f"http://127.0.0.1:{port}"
    wait_http(uri + "/health", proc, log, 120)
    return Server(proc, uri)


@dataclass
class Postgres:
    """A PostgreSQL server of our own on 127.0.0.1 (trust login as `postgres`, all under `dir`)."""

    dir: Path
    port: int

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def _as_postgres(self, *cmd: str, timeout_s: float = 120) -> None:
        runner = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []  # initdb refuses root
        res = subprocess.run([*runner, *cmd], capture_output=True, text=True, timeout=timeout_s)
        assert res.returncode == 0, f"{cmd[0]}: {res.stdout[-1500:]}{res.stderr[-1500:]}"

    def start(self) -> None:
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.dir}"
        self._as_postgres(
            _pg_bin("pg_ctl"), "-D", str(self.dir / "data"), "-w", "-l", str(self.dir / "log"), "-o", opts, "start"
        )

    def stop(self) -> None:
        self._as_postgres(_pg_bin("pg_ctl"), "-D", str(self.dir / "data"), "-w", "-m", "fast", "stop")


def _pg_bin(name: str) -> str:
    import glob
    import shutil

    found = shutil.which(name) or (sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [None])[-1]
    assert found, f"{name}: PostgreSQL's server binaries are not installed (apt-get install postgresql)"
    return found


def start_postgres(databases: tuple[str, ...] = ("mlflow",)) -> Postgres:
    """initdb and start PostgreSQL in a new folder under /tmp (every folder above the data directory must
    be passable by `postgres`), then create `databases`. Stop it with .stop(); remove .dir after."""
    import shutil
    import tempfile

    pg = Postgres(Path(tempfile.mkdtemp(prefix="lspg-", dir="/tmp")), free_port())
    pg.dir.chmod(0o777)  # postgres writes its socket and log here
    if os.getuid() == 0:
        shutil.chown(pg.dir, "postgres")
    pg._as_postgres(_pg_bin("initdb"), "-D", str(pg.dir / "data"), "-U", "postgres", "--auth=trust")
    pg.start()
    for db in databases:
        res = subprocess.run(
            [_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", db],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
    return pg


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


def stop_tree(pids: list[int], timeout_s: float = 10) -> None:
    """SIGTERM to these processes, SIGKILL to whatever of them is left after `timeout_s`: what a test
    started, by PID (never a forced `ray stop`: it ends every Ray on the machine, another suite's too)."""
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, left = psutil.wait_procs(procs, timeout=timeout_s)
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(left, timeout=10)


def ray_pids(temp_dir: Path) -> list[int]:
    """The processes of a Ray started with `--temp-dir temp_dir` (each names its session folder under it)
    and their children."""
    import psutil

    found = set()
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if any(str(temp_dir) in a for a in p.cmdline()):
                found |= {p.pid} | {c.pid for c in p.children(recursive=True)}
    return sorted(found - {os.getpid()})


def tree_pids(pid: int) -> list[int]:
    """A process and all its descendants (Ray's daemons that ray.init started under a driver among them)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


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
