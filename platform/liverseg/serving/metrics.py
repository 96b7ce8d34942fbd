"""What a replica counts, in the Prometheus text format (`GET /metrics`), with prometheus_client.

A replica is one process (uvicorn, one worker; the model slots are threads), so one registry per app
holds everything. If it ever ran several worker processes, prometheus_client's multiprocess mode
applies as is: set `PROMETHEUS_MULTIPROC_DIR` to an empty folder before start, and `render` then
merges every process's files (each gauge below declares how: summed, or the largest for 0/1 flags).
"""

from __future__ import annotations

import os
import threading
from typing import Any

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable (it reads it at import)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)  # s
LOAD_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)  # s: a download and a load
DICE_BUCKETS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0)
ML_BUCKETS = (1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0)  # a liver is ~1500 ml
ROLES = ("champion", "shadow")
SHADOW_OUTCOMES = ("queued", "queue_full", "no_model", "compared", "failed")


class Metrics:
    """Every metric of a replica, registered in its own registry (so tests may build several apps).

    The `loaded`, `load_failed` and `degraded` methods are the holder's events; `loaded` is the one
    place where facts about a served version become metrics (a per-version flag goes there)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, gc_collector, platform_collector, process_collector

        self.registry = CollectorRegistry()
        process_collector.ProcessCollector(registry=self.registry)  # RSS, CPU seconds, open files
        platform_collector.PlatformCollector(registry=self.registry)
        gc_collector.GCCollector(registry=self.registry)
        self._request_metrics()
        self._model_metrics()
        self._shadow_metrics()
        self._shown: dict[str, tuple[str, str, str]] = {}  # role -> the info labels set to 1
        self._lock = threading.Lock()

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
        from prometheus_client import Counter

        return Counter(name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...] = (), mode: str = "livesum") -> Any:
        from prometheus_client import Gauge

        return Gauge(name, doc, labels, registry=self.registry, multiprocess_mode=mode)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> Any:
        from prometheus_client import Histogram

        return Histogram(name, doc, labels, registry=self.registry, buckets=buckets)

    def _request_metrics(self) -> None:
        route, c = ("route",), self._counter
        self.requests = c("liverseg_requests_total", "Requests answered, by route and HTTP status", ("route", "status"))
        self.latency = self._histogram("liverseg_request_seconds", "Time to answer, by route", LATENCY_BUCKETS, route)
        self.bytes_in = c("liverseg_request_bytes_total", "Request body bytes received, by route", route)
        self.bytes_out = c("liverseg_response_bytes_total", "Response body bytes sent, by route", route)
        self.refusals = c(
            "liverseg_refusals_total", "Requests refused by a serve.* limit, by status", ("status", "limit")
        )
        self.voxels = c("liverseg_voxels_segmented_total", "Voxels of the volumes the champion segmented")
        self.queue_depth = self._gauge("liverseg_queue_depth", "Requests waiting for a model slot")
        self.slots_busy = self._gauge("liverseg_slots_busy", "Model slots decoding or segmenting a request")
        self.buffered = self._gauge("liverseg_body_bytes_buffered", "Request body bytes received and held")

    def _model_metrics(self) -> None:
        role, info = ("role",), ("name", "version", "alias")
        self.loads = self._counter(
            "liverseg_model_loads_total", "Model loads, by role and outcome", ("role", "outcome")
        )
        self.load_seconds = self._histogram("liverseg_model_load_seconds", "Time to load a model", LOAD_BUCKETS, role)
        self.switches = self._counter("liverseg_model_switches_total", "Versions swapped in after the first", role)
        self.degraded = self._gauge(
            "liverseg_follow_degraded", "1 while the alias names what cannot load", role, "livemax"
        )
        self.info = {
            "champion": self._gauge("liverseg_model_info", "The served model (value 1)", info, "livemax"),
            "shadow": self._gauge("liverseg_shadow_model_info", "The shadow model (value 1)", info, "livemax"),
        }
        for r in ROLES:  # every series exists from the start: rates and alerts need no special case
            self.loads.labels(r, "ok"), self.loads.labels(r, "failed"), self.switches.labels(r)
            self.degraded.labels(r).set(0)

    def _shadow_metrics(self) -> None:
        self.shadow_requests = self._counter(
            "liverseg_shadow_requests_total", "Answered requests offered to the shadow, by outcome", ("outcome",)
        )
        self.shadow_dice = self._histogram("liverseg_shadow_dice", "Dice of shadow and champion masks", DICE_BUCKETS)
        self.shadow_diff = self._histogram(
            "liverseg_shadow_volume_diff_ml", "Absolute volume difference of the masks (ml)", ML_BUCKETS
        )
        self.shadow_seconds = self._histogram("liverseg_shadow_seconds", "Shadow time per request", LATENCY_BUCKETS)
        self.shadow_queue = self._gauge("liverseg_shadow_queue_depth", "Requests waiting for the shadow")
        self.evidence = self._counter(
            "liverseg_shadow_evidence_writes_total", "Evidence writes to MLflow", ("outcome",)
        )
        for outcome in SHADOW_OUTCOMES:
            self.shadow_requests.labels(outcome)
        self.evidence.labels("ok"), self.evidence.labels("failed")

    # ---- the holder's events
    def loaded(self, role: str, info: Any, seconds: float, switched: bool) -> None:
        """A version of `role` was loaded in `seconds` and now answers (`info`: serving.holder.ServedInfo)."""
        self.loads.labels(role, "ok").inc()
        self.load_seconds.labels(role).observe(seconds)
        if switched:
            self.switches.labels(role).inc()
        labels = (str(info.name or info.uri), str(info.version or ""), str(info.alias or ""))
        with self._lock:
            gauge, old = self.info[role], self._shown.get(role)
            if old is not None and old != labels:
                gauge.labels(*old).set(0)  # multiprocess files keep a removed series: 0 first
                gauge.remove(*old)
            gauge.labels(*labels).set(1)
            self._shown[role] = labels

    def load_failed(self, role: str, seconds: float) -> None:
        self.loads.labels(role, "failed").inc()
        self.load_seconds.labels(role).observe(seconds)

    def follow_state(self, role: str, degraded: bool) -> None:
        self.degraded.labels(role).set(1 if degraded else 0)

    # ---- requests
    def request(self, route: str, status: int, seconds: float, received: int, sent: int, limit: str | None) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        self.bytes_in.labels(route).inc(received)
        self.bytes_out.labels(route).inc(sent)
        if limit:
            self.refusals.labels(str(status), limit).inc()

    def slots(self, waiting: int, busy: int) -> None:
        self.queue_depth.set(waiting)
        self.slots_busy.set(busy)

    # ---- the shadow
    def shadow_compared(self, dice: float, diff_ml: float, seconds: float) -> None:
        self.shadow_requests.labels("compared").inc()
        self.shadow_dice.observe(dice)
        self.shadow_diff.observe(diff_ml)
        self.shadow_seconds.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """(the text exposition, its content type): this registry, or every process's in multiprocess mode."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if os.environ.get(MULTIPROC_DIR):
            from prometheus_client.multiprocess import MultiProcessCollector

            merged = CollectorRegistry()
            MultiProcessCollector(merged)
            return generate_latest(merged), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
