"""Rank 0's MLflow metric writer, off the training hot path.

`log` puts an epoch's metrics on a bounded in-memory queue and returns; a background thread writes the
queue with `log_batch` and, when the tracking server is slow or unreachable, keeps every value and tries
again every `retry_s`. An epoch never waits for the server, and no value is dropped: `close` at the end
of training waits (up to `TRACKING_FLUSH_S`) for the server, then fails naming what it could not write.
The worker's log says once that the server is unreachable and how many values are queued, and once
that it is back.

Hand-written because MLflow's async logging (`log_batch(synchronous=False)`) writes each batch once: a
batch that fails after its HTTP retries is an error on its future, never retried, so an outage longer
than the retries loses it; and the synchronous call blocks an epoch for those retries (minutes).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from liverseg.core.errors import TrackingError
from liverseg.core.limits import MAX_QUEUED_METRICS, TRACKING_FLUSH_S, TRACKING_NOTICE_S
from liverseg.tracking.runs import client

BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics per request


class MetricLogger:
    """Queue per-epoch metrics for run `run_id` on `uri`; a thread writes them (see the module docstring).

    `pending` holds the values not written yet, oldest first; `written` counts those that were."""

    def __init__(self, uri: str | None, run_id: str | None, retry_s: float = 5.0, say=None):
        self.uri, self.run_id, self.retry_s = uri, run_id, retry_s
        self.say = say or (lambda line: print(line, flush=True))  # a worker's stdout: its Ray log
        self.client = client(uri) if uri and run_id else None
        self.pending: list[Any] = []
        self.written = 0
        self.error: Exception | None = None  # the last failed write, while the server stays unreachable
        self._oldest: float | None = None  # when the oldest pending value was queued (monotonic)
        self._noticed = False
        self._closing = False
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue one epoch's metrics and return at once (waits only if MAX_QUEUED_METRICS are queued)."""
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        with self._cv:
            while len(self.pending) + len(batch) > MAX_QUEUED_METRICS and self._alive():
                self._cv.wait(1.0)  # bounded memory: a server down for ~10^4 epochs slows training, drops nothing
            self.pending += batch
            self._oldest = self._oldest or time.monotonic()
            self._notice()
            self._cv.notify_all()
            if not self._alive():  # the first epoch, or logging again after a flush
                self._closing = False
                self._thread = threading.Thread(target=self._write_loop, name="liverseg-metrics", daemon=True)
                self._thread.start()

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _notice(self) -> None:
        """One line once values have waited TRACKING_NOTICE_S (the server slow or down); caller holds _cv."""
        waited = time.monotonic() - self._oldest if self._oldest else 0.0
        if not self._noticed and (self.error is not None or waited > TRACKING_NOTICE_S):
            self._noticed = True
            why = f" ({type(self.error).__name__})" if self.error else f" (no answer for {waited:.0f} s)"
            self.say(
                f"[liverseg] MLflow at {self.uri} unreachable{why}: training goes on, "
                f"{len(self.pending)} metric values queued, retried every {self.retry_s:.0f} s"
            )

    def _write_loop(self) -> None:
        while True:
            with self._cv:
                while not self.pending and not self._closing:
                    self._cv.wait()
                if not self.pending:
                    return
                batch = self.pending[:BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as e:
                with self._cv:
                    self.error = e
                    self._notice()
                    self._cv.wait(self.retry_s)
                continue
            with self._cv:
                del self.pending[: len(batch)]
                self.written += len(batch)
                self._oldest = time.monotonic() if self.pending else None
                if self._noticed and not self.pending:
                    self.say(f"[liverseg] MLflow at {self.uri} reachable again: queued metrics written")
                self._noticed, self.error = self._noticed and bool(self.pending), None
                self._cv.notify_all()

    def flush(self, timeout_s: float = TRACKING_FLUSH_S) -> None:
        """At the end of training: wait until every queued value is written (the server may be back
        within `timeout_s`); raises TrackingError naming what could not be written."""
        if self.client is None:
            return
        deadline = time.monotonic() + timeout_s
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            while self.pending and self._alive() and time.monotonic() < deadline:
                self._cv.wait(min(1.0, max(deadline - time.monotonic(), 0.01)))
            left, error = len(self.pending), self.error
        if left:
            why = f": {type(error).__name__}: {error}" if error else ""
            raise TrackingError(
                f"MLflow at {self.uri}: {left} metric values of run {self.run_id} not written "
                f"within {timeout_s:.0f} s{why}"
            )
