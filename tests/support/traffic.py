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
