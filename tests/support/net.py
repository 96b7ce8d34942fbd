"""Ports on 127.0.0.1 and waiting for a server to answer."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc, log: Path | None = None, timeout_s: float = 120) -> None:
    """Until GET url answers 200; fails with the process's log if it exits or the time runs out."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{url} did not come up: {log.read_text()[-2000:] if log else ''}")
