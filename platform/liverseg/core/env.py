"""The `LIVERSEG_*` environment variables: every one is named and read here, nowhere else.

Secrets (the webhook secret, the reload token, the admin password) come only from the environment or a
secret store mounted into it, never from a file in the repository or a log line.
"""

from __future__ import annotations

import os
from pathlib import Path

LOG_DIR = "LIVERSEG_LOG_DIR"  # command logs (default ./logs, git- and DVC-ignored)
LOCK_DIR = "LIVERSEG_LOCK_DIR"  # host-local lock files (default ~/.cache/liverseg/locks)
ALIAS_IN_EXPERIMENTS = "LIVERSEG_ALIAS_IN_EXPERIMENTS"  # 1: `register` inside `dvc exp run` moves its alias
WEBHOOK_SECRET = "LIVERSEG_WEBHOOK_SECRET"  # HMAC secret shared by MLflow's webhook and the replicas
RELOAD_TOKEN = "LIVERSEG_RELOAD_TOKEN"  # bearer token of a replica's POST /reload
ADMIN_USER, ADMIN_PASSWORD = "LIVERSEG_ADMIN_USER", "LIVERSEG_ADMIN_PASSWORD"  # `users add`'s admin login
GIT_COMMIT = "LIVERSEG_GIT_COMMIT"  # the commit a container image was built from (no .git inside)
FAIL_AT_EPOCH = "LIVERSEG_TEST_FAIL_AT_EPOCH"  # tests only: rank 0 crashes once in that epoch
# a cluster job's services and identity, sealed with the Ray cluster's token (liverseg.training.credentials)
JOB_SEALED_ENV = "LIVERSEG_JOB_SEALED_ENV"


def get(name: str) -> str | None:
    """The variable's value, None when unset or empty (an empty secret is no secret)."""
    return os.environ.get(name) or None


def log_dir() -> Path:
    return Path(get(LOG_DIR) or "logs")


def lock_dir() -> Path:
    return Path(get(LOCK_DIR) or Path.home() / ".cache" / "liverseg" / "locks")


def alias_in_experiments() -> bool:
    return get(ALIAS_IN_EXPERIMENTS) == "1"


def fail_at_epoch() -> int | None:
    value = get(FAIL_AT_EPOCH)
    return int(value) if value else None
