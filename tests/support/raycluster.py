"""A Ray cluster of one node on 127.0.0.1 for a test, as a user starts one (`ray start --head`): its own
temp dir and token (nobody else's `ray.init()` attaches to it), the test's Python first on PATH (submitted
jobs run `python -m liverseg...` there), stopped by the PIDs of its processes."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from support.net import free_port
from support.servers import ray_pids, stop_tree

BIN = Path(sys.executable).parent


@dataclass
class RayHead:
    dir: Path  # short: Ray's Unix sockets live under it
    env: dict[str, str]  # what a client shell exports: RAY_ADDRESS (the dashboard), the token
    gcs: str  # HOST:PORT of its GCS: what `ray start --address` and `ray.init(address=...)` take

    def add_node(self, cpus: int, base_env: dict[str, str]) -> None:
        """One more node on this machine (it shares the head's temp dir, so `stop` ends it too)."""
        env = {**base_env, **self.env, "PATH": f"{BIN}:{base_env['PATH']}"}
        env.pop("RAY_ADDRESS")
        args = ["--address", self.gcs, "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus)]
        res = subprocess.run([str(BIN / "ray"), "start", *args], env=env, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr[-3000:]

    def stop(self, timeout_s: float = 30) -> None:
        stop_tree(ray_pids(self.dir / "ray"), timeout_s)


def start_ray_head(root: Path, cpus: int = 2, base_env: dict[str, str] | None = None) -> RayHead:
    """`ray start --head` with token auth under `root` (keep it short), from the shell `base_env` (the
    user's: its PYTHONPATH is the code jobs run); its client environment."""
    root.mkdir(parents=True, exist_ok=True)
    token = root / "token"
    token.write_text(secrets.token_hex(32))
    dashboard = free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    base = dict(os.environ if base_env is None else base_env)
    env = {**base, **auth, "PATH": f"{BIN}:{base['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    gcs = f"127.0.0.1:{free_port()}"
    args = ["--head", "--node-ip-address", "127.0.0.1", "--port", gcs.split(":")[1], "--num-cpus", str(cpus)]
    args += ["--temp-dir", str(root / "ray"), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1"]
    args += ["--dashboard-port", str(dashboard), "--disable-usage-stats"]
    head = RayHead(root, {**auth, "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}"}, gcs)
    res = subprocess.run([str(BIN / "ray"), "start", *args], env=env, capture_output=True, text=True, timeout=180)
    if res.returncode != 0:
        head.stop()
        raise AssertionError(f"ray start failed: {res.stderr[-3000:]}")
    return head
