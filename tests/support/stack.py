"""The local team stack (deploy/local/up.sh, down.sh) for tests: real PostgreSQL, S3 (moto), MLflow with
basic-auth and a two-node Ray cluster on 127.0.0.1, stopped by PID when the test ends (also on failure).
The fixture `team_stack` (conftest) yields a `Stack`:

    def test_x(team_stack):
        env = team_stack.env_for("admin")      # os.environ + the stack's KEY=VALUE lines + credentials
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from support.cli import run_liverseg  # noqa: E402
from support.paths import REPO  # noqa: E402

UP, DOWN = REPO / "deploy" / "local" / "up.sh", REPO / "deploy" / "local" / "down.sh"
sys.path.insert(0, str(REPO / "deploy" / "local"))
from stackpids import stack_pids  # noqa: E402


@dataclass
class Stack:
    """One stack folder; `up()` (re)starts it and reads its KEY=VALUE lines into `env`."""

    dir: Path
    env: dict[str, str] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)

    def up(self, timeout_s: float = 600) -> dict[str, str]:
        res = subprocess.run([str(UP), str(self.dir)], capture_output=True, text=True, timeout=timeout_s)
        assert res.returncode == 0, res.stderr[-3000:]
        self.env = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
        self.passwords["admin"] = self.env["LIVERSEG_ADMIN_PASSWORD"]
        return self.env

    def down(self, timeout_s: float = 120) -> None:
        res = subprocess.run([str(DOWN), str(self.dir)], capture_output=True, text=True, timeout=timeout_s)
        assert res.returncode == 0, res.stderr[-3000:]

    def processes(self) -> list[int]:
        """Every live process up started: the recorded PIDs, their descendants, Ray's under DIR/ray."""
        roots = [int(p) for f in (self.dir / "pids").glob("*") for p in f.read_text().split()]
        return stack_pids(str(self.dir / "ray"), roots)

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


def new_stack_dir() -> Path:
    """A short folder under /tmp: Unix socket paths below it must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix="lsk-", dir="/tmp"))


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
