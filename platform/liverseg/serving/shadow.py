"""The shadow: a challenger (`serve.shadow`, e.g. models:/liver-unet-candidates@challenger) that segments
every answered request too, unseen, and how far its masks agree with the champion's.

Only the champion answers. After it has segmented a request, its input volume and mask are offered to a
bounded queue (`serve.shadow_queue` requests, `serve.shadow_queue_mb` MiB); when full the request is not
shadowed (counted), never waited for. One thread, at the lowest CPU priority, takes the queue while no
request holds or awaits a model slot, segments with its own model (its own holder follows its alias,
webhook and polling, like the champion's), and compares: Dice and volume difference per request, kept
per (challenger version, champion version) and written to MLflow every `serve.evidence_s` seconds and
at shutdown (`tracking.shadow`). A shadow that cannot load leaves the champion serving and says so.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from liverseg.core.clock import utc_now
from liverseg.core.errors import one_line
from liverseg.serving.holder import ModelHolder
from liverseg.tracking.shadow import ShadowSummary

SHADOW_NICE = 19  # the shadow thread's CPU priority (and its resize threads'): the champion's requests first
KEPT_DICE = 100_000  # Dice values kept per series for the 5th percentile (800 kB); a seeded sample beyond


@dataclass
class Job:
    """One answered request for the shadow: (Z, Y, X) int16 HU and the champion's (Z, Y, X) uint8 mask,
    both in canonical orientation on the request's grid; ml per voxel; the champion version that answered."""

    image: np.ndarray
    mask: np.ndarray
    voxel_ml: float
    champion: str

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + self.mask.nbytes


def agreement(a: np.ndarray, b: np.ndarray, voxel_ml: float) -> tuple[float, float]:
    """(Dice, |volume a - volume b| in ml) of two binary masks on one grid; Dice is 1.0 when both are empty."""
    na, nb = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    both = int(np.count_nonzero(np.logical_and(a, b)))
    return (1.0 if na + nb == 0 else 2.0 * both / (na + nb)), abs(na - nb) * voxel_ml


class Agreement:
    """Running agreement of one challenger version with one champion version on one replica."""

    def __init__(self, name: str, version: str, champion: str, replica: str):
        self.name, self.version, self.champion, self.replica = name, version, champion, replica
        self.compared, self.not_shadowed, self.dice_sum, self.diff_max = 0, 0, 0.0, 0.0
        self.kept: list[float] = []
        self.since, self._rng = "", random.Random(0)

    def add(self, dice: float, diff_ml: float) -> None:
        self.since = self.since or utc_now()
        self.compared += 1
        self.dice_sum += dice
        self.diff_max = max(self.diff_max, diff_ml)
        if len(self.kept) < KEPT_DICE:
            self.kept.append(dice)
        elif (j := self._rng.randrange(self.compared)) < KEPT_DICE:  # reservoir sampling: a uniform sample
            self.kept[j] = dice

    def summary(self) -> ShadowSummary:
        return ShadowSummary(
            name=self.name,
            version=self.version,
            compared=self.compared,
            dice_mean=self.dice_sum / self.compared if self.compared else float("nan"),
            dice_p05=float(np.percentile(self.kept, 5)) if self.kept else float("nan"),
            volume_diff_ml_max=self.diff_max,
            since=self.since,
            updated=utc_now(),
            not_shadowed=self.not_shadowed,
            against=(self.champion,),
            replicas=(self.replica,),
        )


class Shadow:
    """The queue, the thread and the agreement series of a replica's shadow.

    `write(summary, final)`: where evidence goes (`tracking.shadow.write_evidence`), None: nowhere.
    `idle`: set while the champion has no request in or waiting for a model slot; the app hands over its
    `Slots.idle` (until then, always set)."""

    def __init__(self, holder: ModelHolder, cfg: Any, metrics: Any, replica: str, write=None):
        self.holder, self.metrics, self.replica, self.write = holder, metrics, replica, write
        self.idle = threading.Event()
        self.idle.set()
        self.max_jobs, self.max_bytes, self.evidence_s = cfg.shadow_queue, cfg.shadow_queue_mb << 20, cfg.evidence_s
        self.jobs: deque[Job] = deque()
        self.held = 0  # bytes of the queued jobs and the one being compared
        self._cond = threading.Condition()
        self._lock = threading.Lock()  # the series: added to by request threads and the shadow's, read by /model
        self._stop = threading.Event()
        self.series: dict[tuple[str, str], Agreement] = {}
        self.dirty: set[tuple[str, str]] = set()
        self.evidence_error: str | None = None
        self.thread: threading.Thread | None = None

    def offer(self, image: np.ndarray, mask: np.ndarray, voxel_ml: float, champion: str) -> str:
        """Queue an answered request (the arrays are not copied: the champion is done with them); returns
        the outcome: queued, queue_full or no_model."""
        job = Job(image, mask, voxel_ml, champion)
        if self.holder.current is None:
            outcome = "no_model"
        else:
            with self._cond:
                full = len(self.jobs) >= self.max_jobs or self.held + job.nbytes > self.max_bytes
                if not full:
                    self.jobs.append(job)
                    self.held += job.nbytes
                    self._cond.notify()
                depth = len(self.jobs)
            outcome = "queue_full" if full else "queued"
            if full:
                self._missed(champion)
            self.metrics.shadow_queue.set(depth)
        self.metrics.shadow_requests.labels(outcome).inc()
        return outcome

    def _series(self, champion: str) -> Agreement:
        """The series of the shadow's current version against `champion`, marked changed (hold _lock)."""
        info = self.holder.current.info
        key = (str(info.version or ""), champion)
        if key not in self.series:
            self.series[key] = Agreement(str(info.name or info.uri), key[0], champion, self.replica)
        self.dirty.add(key)
        return self.series[key]

    def _missed(self, champion: str) -> None:
        with self._lock:
            self._series(champion).not_shadowed += 1

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self.thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the thread (the queue is dropped) and write the evidence a last time, within `timeout_s`."""
        self._stop.set()
        with self._cond:
            self._cond.notify()
        if self.thread is not None:
            self.thread.join(timeout_s)
        last = threading.Thread(target=self.flush, args=(True,), name="shadow-evidence", daemon=True)
        last.start()
        last.join(timeout_s)

    def _run(self) -> None:
        _lower_priority()
        due = time.monotonic() + self.evidence_s
        while not self._stop.is_set():
            with self._cond:
                if not self.jobs:
                    self._cond.wait(max(0.0, due - time.monotonic()))
                job = self.jobs.popleft() if self.jobs else None
            if job is not None and self._when_idle():
                self._compare(job)
            if job is not None:
                with self._cond:
                    self.held -= job.nbytes
                    self.metrics.shadow_queue.set(len(self.jobs))
            if time.monotonic() >= due:
                self.flush()
                due = time.monotonic() + self.evidence_s

    def _when_idle(self) -> bool:
        """Wait until the champion has nothing to do; False when stopping."""
        while not self.idle.wait(0.5):
            if self._stop.is_set():
                return False
        return not self._stop.is_set()

    def _compare(self, job: Job) -> None:
        from liverseg.model.inference import segment_canonical

        served = self.holder.current  # the version loaded last (never None once a request was queued)
        t0 = time.perf_counter()
        try:
            mask = segment_canonical(served.lm, job.image)
            dice, diff = agreement(job.mask, mask, job.voxel_ml)
        except Exception as e:  # e.g. out of memory: the champion answered already; count and go on
            self._missed(job.champion)
            self.metrics.shadow_requests.labels("failed").inc()
            print(f"warning: shadow failed on a request: {one_line(e)}", flush=True)
            return
        with self._lock:
            self._series(job.champion).add(dice, diff)
        self.metrics.shadow_compared(dice, diff, time.perf_counter() - t0)

    def flush(self, final: bool = False) -> None:
        """Write the summaries that changed since the last write (registry versions only); `final`: every
        one, ending its run."""
        if self.write is None:
            return
        with self._lock:
            due = {key: self.series[key].summary() for key in (self.series if final else self.dirty)}
            self.dirty.clear()
        for key, summary in sorted(due.items()):
            if summary.compared == 0 or not summary.version.isdigit():
                continue
            try:
                self.write(summary, final)
                self.evidence_error = None
                self.metrics.evidence.labels("ok").inc()
            except Exception as e:  # e.g. an account without EDIT on the shadow experiment: serving goes on
                with self._lock:
                    self.dirty.add(key)
                self.evidence_error = one_line(e)
                self.metrics.evidence.labels("failed").inc()
                print(f"warning: shadow evidence not written: {self.evidence_error}", flush=True)

    def describe(self) -> dict[str, Any]:
        """The shadow in `/model`: its model (or why none), its queue, its agreement with the champion."""
        status, reason = self.holder.status()
        served = self.holder.current
        with self._lock:
            now = str(served.info.version) if served else None
            agreement = [a.summary().to_json() for (v, _), a in self.series.items() if v == now and a.compared]
        return {
            "uri": self.holder.uri,
            **({k: served.info.to_json()[k] for k in ("name", "version", "alias", "since")} if served else {}),
            "status": "no model" if served is None else status,
            "reason": reason,
            "queued": len(self.jobs),
            "agreement": agreement,
            "evidence_error": self.evidence_error,
        }


def _lower_priority() -> None:
    """Lowest CPU priority for the calling thread (Linux: per thread; threads it starts inherit it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICE)
    except (AttributeError, OSError):  # elsewhere: the shadow competes at the champion's priority
        pass
