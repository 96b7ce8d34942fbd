"""A worker's MLflow metric writer: per-epoch metrics of the rank-0 worker, never dropped on a failed write."""

from __future__ import annotations

import time

from liverseg.core.errors import TrackingError
from liverseg.tracking.runs import client


class MetricLogger:
    """Rank 0's MLflow writer: a failed write is kept and retried with the next epoch, never dropped."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.run_id, self.pending = run_id, []
        self.client = None
        if uri and run_id:
            self.client = client(uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.flush(raise_on_error=False)

    def flush(self, raise_on_error: bool = True) -> None:
        if not self.pending or self.client is None:
            return
        try:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []
        except Exception as e:
            if raise_on_error:
                raise TrackingError(f"MLflow: {len(self.pending)} metric values could not be written: {e}") from e
            print(f"[liverseg] MLflow write failed, will retry: {type(e).__name__}", flush=True)
