"""Command lines of `liverseg` for subprocesses (a test runs the command as a user would)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

LIVERSEG = [sys.executable, "-m", "liverseg.cli"]


def cli_cmd(command: str, store: str | Path, *sets: str, raw: Path | None = None) -> list[str]:
    """`python -m liverseg.cli COMMAND --store STORE [--raw RAW] --set S ...` for a subprocess."""
    cmd = [*LIVERSEG, command, "--store", str(store)]
    return cmd + (["--raw", str(raw)] if raw else []) + [x for s in sets for x in ("--set", s)]


def run_liverseg(
    args: list[str], env: dict | None = None, cwd=None, stdin: str | None = None, timeout_s: float = 600
) -> subprocess.CompletedProcess:
    """Run `liverseg ARGS` as a user would (a subprocess); its output as text."""
    return subprocess.run(
        [*LIVERSEG, *args], env=env, capture_output=True, text=True, timeout=timeout_s, cwd=cwd, input=stdin
    )
