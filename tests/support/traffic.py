"""Traffic against serving replicas: a client thread that keeps segmenting small volumes, and waiting
until a replica serves a version."""

from __future__ import annotations

import gzip
import threading
import time
from collections import defaultdict

import httpx
import nibabel as nib
import numpy as np


class TrafficClient(threading.Thread):
    """Keeps sending small volumes to each replica; records (status, version) per replica."""

    def __init__(self, bases: list[str]):
        super().__init__(daemon=True)
        self.bases, self.seen, self.done = bases, defaultdict(list), threading.Event()
        self.body = gzip.compress(nib.Nifti1Image(np.full((24, 24, 4), 60, np.int16), np.eye(4)).to_bytes())

    def run(self):
        while not self.done.is_set():
            for base in self.bases:
                try:
                    r = httpx.post(base + "/segment", content=self.body, timeout=60)
                    self.seen[base].append((r.status_code, r.headers.get("x-model-version")))
                except httpx.HTTPError as e:
                    self.seen[base].append((type(e).__name__, None))


def wait_version(base: str, version: str, timeout_s: float = 90) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if httpx.get(base + "/model", timeout=5).json()["version"] == version:
            return time.time()
        time.sleep(0.05)
    raise AssertionError(f"{base} still serves {httpx.get(base + '/model').json()['version']}, not v{version}")


class Trickler(threading.Thread):
    """A client that declares a large body and sends it one byte every `every_s` seconds from `source`
    (any 127.x.y.z address is this machine: a distinct client to the server); keeps the answer."""

    def __init__(self, base: str, source: str = "127.0.0.1", declared: int = 512 << 20, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.base, self.source, self.declared, self.every_s = base, source, declared, every_s
        self.answer, self.seconds, self.sent, self.error = b"", 0.0, 0, ""

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            self._trickle(t0)
        except OSError as e:  # refused or reset before a byte of body went: say so
            self.error = f"{type(e).__name__}: {e}"
        self.seconds = time.monotonic() - t0

    def _trickle(self, t0: float) -> None:
        import socket

        host, port = self.base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60, source_address=(self.source, 0)) as sock:
            head = f"POST /segment HTTP/1.1\r\nHost: {host}\r\nContent-Length: {self.declared}\r\n\r\n"
            sock.sendall(head.encode())
            sock.settimeout(self.every_s)
            while not self.answer.endswith(b"}") and time.monotonic() - t0 < 120:
                try:
                    sock.sendall(b"x")
                    self.sent += 1
                except OSError:  # the server closed the connection
                    break
                try:
                    part = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not part:
                    break
                self.answer += part

    @property
    def status(self) -> int | None:
        return int(self.answer.split()[1]) if self.answer.startswith(b"HTTP/1.1 ") else None
