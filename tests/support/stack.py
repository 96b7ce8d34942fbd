"""The local team stack (deploy/local/stack.py) for tests: real PostgreSQL, S3 (SeaweedFS), MLflow with
basic-auth and a two-node Ray cluster on 127.0.0.1, stopped by process tree when the test ends (also on
failure). The fixture `team_stack` (conftest) yields a `Stack`:

    def test_x(team_stack):
        env = team_stack.env_for("admin")      # os.environ + the stack's KEY=VALUE lines + credentials
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from support.cli import run_liverseg
from support.paths import REPO

STACK = REPO / "deploy" / "local" / "stack.py"


def _stack_module():
    """deploy/local/stack.py as a module (its folder is no package): the same process accounting as `down`."""
    sys.path.insert(0, str(STACK.parent))
    try:
        import stack
    finally:
        sys.path.remove(str(STACK.parent))
    return stack


@dataclass
class Stack:
    """One stack folder; `up()` (re)starts it and reads its KEY=VALUE lines into `env`."""

    dir: Path
    env: dict[str, str] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)

    def run(self, command: str, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(STACK), command, str(self.dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def up(self, *args: str) -> dict[str, str]:
        res = self.run("up", *args)
        assert res.returncode == 0, res.stderr[-3000:]
        self.env = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
        self.passwords["admin"] = self.env["LIVERSEG_ADMIN_PASSWORD"]
        return self.env

    def down(self) -> None:
        res = self.run("down", timeout_s=120)
        assert res.returncode == 0, res.stderr[-3000:]

    def processes(self) -> list[int]:
        """Every live process up started: recorded servers, their descendants, Ray's under DIR/ray."""
        return [p.pid for p in _stack_module().Stack(self.dir).processes()]

    def kill(self) -> list[int]:
        """kill -9 of every process of the stack at once, as a crash of its servers would do; returns once
        they are dead (exited, or zombies their new parent has not reaped yet)."""
        import psutil

        procs = [psutil.Process(pid) for pid in self.processes()]
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in procs):
            time.sleep(0.05)
        return [p.pid for p in procs]

    def remove(self) -> None:
        """The folder new_stack_dir made, and PostgreSQL's files where DIR/pg links elsewhere (as root with
        DIR closed to the postgres user)."""
        pg = self.dir / "pg"
        if pg.is_symlink():
            shutil.rmtree(pg.resolve(), ignore_errors=True)
        shutil.rmtree(self.dir.parent if self.dir.parent.name.startswith("lsk-") else self.dir, ignore_errors=True)

    def env_for(self, user: str, **extra: str) -> dict[str, str]:
        """The environment of a team member's shell: up's lines (the admin's only for admin) and their login."""
        shared = {k: v for k, v in self.env.items() if user == "admin" or not k.startswith("LIVERSEG_ADMIN_")}
        return {
            **os.environ,
            **shared,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": self.passwords[user],
            **extra,
        }


def _alive(p) -> bool:
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def new_stack_dir(closed: bool = False) -> Path:
    """DIR (not made yet: the stack makes it) in a new short folder under /tmp (Unix socket paths below it
    must stay under 108 bytes). closed: that folder stays 0700, as `mktemp -d` makes it, so that as root
    the postgres user cannot reach DIR; otherwise others may pass through it (0711)."""
    parent = Path(tempfile.mkdtemp(prefix="lsk-", dir="/tmp"))
    if not closed:
        parent.chmod(0o711)
    return parent / "s"


def add_team(stack) -> None:
    """alice and bob (scientists, generated passwords printed once), rita (release, given password)."""
    for user, role in (("alice", "scientist"), ("bob", "scientist")):
        res = run_liverseg(["users", "add", user, "--role", role], stack.env_for("admin"))
        assert res.returncode == 0, res.stderr
        stack.passwords[user] = res.stdout.split(f"password for {user} (shown once): ")[1].split()[0]
    res = run_liverseg(
        ["users", "add", "rita", "--role", "release", "--password-stdin"],
        stack.env_for("admin"),
        stdin="rita-password-123\n",
    )
    assert res.returncode == 0 and "password" not in res.stdout.split(";")[-1], res.stdout + res.stderr
    stack.passwords["rita"] = "rita-password-123"
    again = run_liverseg(["users", "add", "rita", "--role", "scientist"], stack.env_for("admin"))
    assert again.returncode == 1 and "user rita: already exists" in again.stderr
