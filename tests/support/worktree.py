"""A user's copy of the repository: the files a clean clone would have, committed in a new repo, and the
environment a user's shell has there (no test tracking URI or Ray address; the copy's own code)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from support.paths import REPO

BIN = Path(sys.executable).parent


def user_env(repo: Path | None = None) -> dict:
    # as a user has it: no tracking URI or Ray address of the tests, logs in the copy's own logs/
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "LIVERSEG_LOG_DIR")}
    if repo is not None:  # run the copy's own code, not the editable install's
        env["PYTHONPATH"] = str(repo / "platform")
    return {
        **env,
        "PATH": f"{BIN}:{env['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }


def sh(cmd, cwd) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=user_env(cwd), capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd}: {res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def clone_worktree(dst: Path) -> None:
    """The files a clean clone would have (tracked, plus new files not ignored), committed in a new repo."""
    listed = sh(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], REPO).split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    sh(["git", "init", "-q"], dst)
    sh(["git", "add", "-A"], dst)
    sh(["git", "commit", "-qm", "clone"], dst)
