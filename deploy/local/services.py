"""How deploy/local/stack.py starts each server of the team stack (PostgreSQL, SeaweedFS for S3, MLflow,
Ray) and knows it is ready; each function gets the stack (folder, logs, `spawn`), the secrets, the ports."""

from __future__ import annotations

import base64
import configparser
import contextlib
import hashlib
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from stack import Stack

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # mlflow, ray and weed come with the venv that runs the stack
AUTH_TEMPLATE = REPO / "deploy" / "mlflow" / "basic_auth.ini"  # one template: local, compose, Kubernetes
APP_NAME = "basic-auth"  # the MLflow server app (`mlflow server --app-name`): named here only
BUCKET = "liverseg"
WORKERS = 2  # MLflow's uvicorn workers (`up --workers`): sized by docs/benchmarks.md's team-stack load
POOL_SIZE = 16  # MLflow's pool per engine (3 a process: tracking, registry, auth) + as much overflow: team_load
LEAN = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # the GenAI job runner: 8 more processes, +2.3 GB
SECRET_KEYS = ("PG_PASSWORD", "ADMIN_PASSWORD", "S3_SECRET", "WEBHOOK_SECRET", "FLASK_SECRET")


class StackError(Exception):
    """A refusal or failure, told in one line."""


def say(msg: str) -> None:  # progress and notices: stderr (stdout carries the KEY=VALUE lines)
    print(f"stack: {msg}", file=sys.stderr, flush=True)


def free_port(previous: int | None = None) -> int:
    """`previous` (the port the last up had) while it is free, so members' shells keep working across a
    restart; else any free port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no owner
        try:
            s.bind(("127.0.0.1", previous or 0))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, what: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `check()` until it returns true; fails early when `proc` (the server) exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with status {proc.returncode} (see {log})")
        time.sleep(0.1)
    raise StackError(f"{what} not ready within {timeout_s:.0f} s (see {log})")


def http_answers(url: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status of GET url (any answer means the server is up; no answer raises)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def pool_env(size: int) -> dict[str, str]:
    """MLflow's pool settings. PostgreSQL's max_connections follows from them (`max_connections`): a busy
    server waits for a pooled connection, never is refused one; idle connections are renewed after 30 min."""
    pool = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": str(size), "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": str(size)}
    return {**pool, "MLFLOW_SQLALCHEMYSTORE_POOL_RECYCLE": "1800"}


def max_connections(workers: int, pool: int) -> int:
    """Connections MLflow may hold: (workers + the parent) x 3 engines x (pool + overflow), + a margin."""
    return (workers + 1) * 3 * 2 * pool + 10


# --- secrets and the auth settings ---------------------------------------------------------------------
def load_secrets(d: Path) -> dict[str, str]:
    """Generated at the first up, kept in DIR/secrets.env (0600), never in the repository."""
    f = d / "secrets.env"
    if not f.exists():
        values = {k: secrets.token_urlsafe(24) for k in SECRET_KEYS}
        values["S3_KEY_ID"] = "liverseg-" + secrets.token_hex(4)
        values["WEBHOOK_KEY"] = base64.urlsafe_b64encode(os.urandom(32)).decode()  # Fernet key
        write_private(f, values)
    return dict(line.split("=", 1) for line in f.read_text().splitlines() if "=" in line)


def write_private(path: Path, values: dict[str, str] | str) -> None:
    text = values if isinstance(values, str) else "".join(f"{k}={v}\n" for k, v in values.items())
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(path)


def auth_ini(database_uri: str) -> str:
    """deploy/mlflow/basic_auth.ini with this stack's auth database (the one template, rendered)."""
    ini = configparser.ConfigParser()
    ini.read_string(AUTH_TEMPLATE.read_text())
    ini["mlflow"]["database_uri"] = database_uri
    lines = [f"{k} = {v}" for k, v in ini["mlflow"].items()]
    return "# rendered from deploy/mlflow/basic_auth.ini by deploy/local/stack.py\n[mlflow]\n" + "\n".join(lines) + "\n"


# --- PostgreSQL ------------------------------------------------------------------------------------------
def pg_bin() -> Path:
    found = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))[-1:]), None)
    if not found:
        raise StackError("PostgreSQL server binaries (initdb, postgres) not found: apt-get install postgresql")
    return Path(found).resolve().parent


def pg_user() -> str | None:
    """As root PostgreSQL runs as `postgres` (it refuses root); otherwise as whoever runs the stack."""
    if os.getuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        raise StackError("as root PostgreSQL needs a 'postgres' user (apt-get install postgresql)") from None


def pg_home(d: Path, user: str | None) -> Path:
    """DIR/pg, or as root where `postgres` cannot reach DIR: a folder of its own that DIR/pg links to."""
    link = d / "pg"
    if link.is_symlink() or link.is_dir():
        return link.resolve()  # an earlier up chose
    if user is None or subprocess.run(["test", "-x", str(d)], user=user).returncode == 0:
        link.mkdir(mode=0o700)
        if user:
            shutil.chown(link, user, user)
        return link
    home = Path(pwd.getpwnam(user).pw_dir) / "liverseg-stacks"
    if subprocess.run(["test", "-w", str(home.parent)], user=user).returncode != 0:
        raise StackError(f"{d}: user {user} can reach neither it nor its home {home.parent}; use a folder it can")
    target = home / hashlib.sha256(str(d).encode()).hexdigest()[:16]
    for f in (home, target):
        f.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(f, user, user)
    link.symlink_to(target)
    say(f"{user} cannot reach {d} (a folder above it is closed): PostgreSQL's files are in {target}")
    return target


def start_postgres(st: Stack, sec: dict[str, str], port: int, max_connections: int) -> subprocess.Popen:
    user, bindir = pg_user(), pg_bin()
    home = pg_home(st.dir, user)
    if not (home / "data" / "PG_VERSION").exists():
        pw = home / "pwfile"
        pw.write_text(sec["PG_PASSWORD"] + "\n")
        if user:
            shutil.chown(pw, user, user)
        with open(st.logs / "initdb.log", "wb") as log:
            init = [bindir / "initdb", "-D", home / "data", "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={pw}"]
            rc = subprocess.run([str(a) for a in init], stdout=log, stderr=log, user=user, cwd="/").returncode
        pw.unlink()
        if rc:
            raise StackError(f"initdb failed (see {st.logs / 'initdb.log'})")
    clear_stale_lock(home / "data" / "postmaster.pid")
    opts = ["-h", "127.0.0.1", "-p", port, "-k", "", "-c", f"max_connections={max_connections}"]
    return st.spawn("postgres", [bindir / "postgres", "-D", home / "data", *opts], user=user, cwd="/")


def clear_stale_lock(lock: Path) -> None:
    """After a kill -9 the lock file names a PID perhaps not reaped yet (a zombie PostgreSQL takes for a live
    postmaster): a lock naming no live process goes, as PostgreSQL's own would."""
    try:
        if psutil.Process(int(lock.read_text().split()[0])).status() != psutil.STATUS_ZOMBIE:
            return  # alive: PostgreSQL refuses to start, and says so in its log
    except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
        pass
    lock.unlink(missing_ok=True)


def create_databases(sec: dict[str, str], port: int) -> bool:
    """MLflow's two databases, once; raises while PostgreSQL does not answer yet (a readiness check)."""
    import psycopg

    login = {"host": "127.0.0.1", "port": port, "user": "postgres", "password": sec["PG_PASSWORD"]}
    with psycopg.connect(**login, dbname="postgres", autocommit=True, connect_timeout=2) as conn:
        have = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        for db in {"mlflow", "mlflow_auth"} - have:
            conn.execute(f"CREATE DATABASE {db}")
    return True


# --- S3: SeaweedFS ---------------------------------------------------------------------------------------
def start_s3(st: Stack, sec: dict[str, str], port: int) -> subprocess.Popen:
    """SeaweedFS master, volume, filer and S3 gateway in one process; objects are files under DIR/s3."""
    (st.dir / "s3").mkdir(exist_ok=True)  # weed runs there: it reads a security.toml from its cwd first
    ident = {"name": "liverseg", "credentials": [{"accessKey": sec["S3_KEY_ID"], "secretKey": sec["S3_SECRET"]}]}
    ident["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    write_private(st.dir / "s3-identities.json", json.dumps({"identities": [ident]}))
    prev = st.state.get("weed_ports", {})
    ports = {k: free_port(prev.get(k)) for k in ("master", "volume", "filer")}
    grpc = {k: free_port(prev.get(f"{k}.grpc")) for k in ("master", "volume", "filer", "s3")}
    st.state["weed_ports"] = {**ports, **{f"{k}.grpc": v for k, v in grpc.items()}}
    # Unix sockets a killed SeaweedFS left: its own under DIR/s3, and the gRPC ones it names by port in /tmp
    stale = [st.dir / "s3" / n for n in ("filer.sock", "s3.sock")]
    for f in stale + [f for p in grpc.values() for f in Path("/tmp").glob(f"seaweedfs-*-grpc-{p}.sock")]:
        f.unlink(missing_ok=True)
    cmd = [BIN / "weed", "server", f"-dir={st.dir / 's3'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3"]
    cmd += [f"-s3.port={port}", f"-s3.config={st.dir / 's3-identities.json'}", "-volume.preStopSeconds=0"]
    cmd += ["-master.volumeSizeLimitMB=1024", "-volume.max=0"]  # 1 GB volume files, as many as the disk holds
    cmd += [f"-{k}.port={v}" for k, v in ports.items()] + [f"-{k}.port.grpc={v}" for k, v in grpc.items()]
    cmd += [f"-filer.localSocket={st.dir / 's3' / 'filer.sock'}", f"-s3.localSocket={st.dir / 's3' / 's3.sock'}"]
    return st.spawn("s3", cmd, env={"GOMEMLIMIT": "160MiB"}, cwd=st.dir / "s3")  # Go's heap: ~120 MB, not 400


def make_bucket(sec: dict[str, str], port: int) -> bool:
    """The bucket, once; raises while the S3 gateway does not answer yet (a readiness check)."""
    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1", aws_access_key_id=sec["S3_KEY_ID"],
        aws_secret_access_key=sec["S3_SECRET"], config=Config(retries={"max_attempts": 1}, connect_timeout=2),
    )  # fmt: skip
    if BUCKET not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=BUCKET)
    return True


# --- MLflow ----------------------------------------------------------------------------------------------
def mlflow_env(st: Stack, sec: dict[str, str], pg: str, s3: str, pool: int) -> dict[str, str]:
    """The tracking server's environment: backend, auth settings, bucket, pool, no job runner."""
    write_private(st.dir / "basic_auth.ini", auth_ini(f"{pg}/mlflow_auth"))
    return {
        **LEAN, **pool_env(pool), "MLFLOW_BACKEND_STORE_URI": f"{pg}/mlflow", "MLFLOW_AUTH_CONFIG_PATH": str(st.dir / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": sec["ADMIN_PASSWORD"],
        "MLFLOW_S3_ENDPOINT_URL": s3, "AWS_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": sec["S3_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": sec["S3_SECRET"], "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": sec["WEBHOOK_KEY"], "MLFLOW_FLASK_SERVER_SECRET_KEY": sec["FLASK_SECRET"],
        # webhooks may go to http://127.0.0.1 replicas; a new one is seen within 5 s (MLflow caches the list)
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_CACHE_TTL": "5", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # fmt: skip


def mlflow_command(port: int, workers: int, app_name: str = APP_NAME) -> list:
    return [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", port, "--workers", workers,
            "--artifacts-destination", f"s3://{BUCKET}/artifacts", "--app-name", app_name]  # fmt: skip


# --- Ray -------------------------------------------------------------------------------------------------
def ray_env(d: Path) -> dict[str, str]:
    """Token auth with this stack's own token (not ~/.ray/auth_token, which every local cluster shares)."""
    token = d / "ray-token"
    if not token.exists():
        write_private(token, secrets.token_hex(32) + "\n")
    # submitted jobs (`liverseg tune --submit`) start `python -m liverseg...` on the head: the nodes' PATH
    # leads to this Python first, as the image's does on Kubernetes
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0", "PATH": path}


def ray_node(st: Stack, head: str | None, cpus: int, dash_port: int = 0) -> subprocess.Popen:
    """`ray start` of the head (head=None) or of one more node; every port of its own, so two stacks
    (or a user's Ray) on the machine do not collide. The command returns once its node is up."""
    ports = ["--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port"]
    ports += ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port"]
    cmd = [BIN / "ray", "start", "--node-ip-address", "127.0.0.1", "--num-cpus", cpus, "--disable-usage-stats"]
    cmd += ["--object-store-memory", "200000000", *[a for p in ports for a in (p, free_port())]]
    if head is None:
        cmd += ["--head", "--port", st.state["ports"]["ray"], "--temp-dir", st.dir / "ray"]
        cmd += [
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            dash_port,
            "--ray-client-server-port",
            free_port(),
        ]
    else:
        cmd += ["--address", head]
    with open(st.logs / f"ray-{'head' if head is None else 'node'}.log", "ab") as log:
        return subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **ray_env(st.dir)}, stdin=subprocess.DEVNULL)  # fmt: skip
