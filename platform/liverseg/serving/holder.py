"""The model a replica serves (or shadows), and following its alias: load the new version first, then
swap the reference, so in-flight requests finish on the old one and none is dropped. A version that
cannot be loaded leaves the old one serving, makes the holder `degraded` (with the reason), and is
tried again only after a backoff that doubles up to `retry_max_s`: never a full download every poll."""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from liverseg.core.clock import utc_now
from liverseg.core.errors import one_line
from liverseg.model.artifact import LoadedModel
from liverseg.tracking import tags
from liverseg.tracking.models import load_model, parse_model_uri, resolve_version
from liverseg.tracking.runs import client


@dataclass
class ServedInfo:
    """What `/model` says of the served model: where it came from, its registry version and the facts on it,
    its preprocessing, and since when (UTC) it answers."""

    uri: str
    preprocessing: dict[str, Any]
    name: str | None = None  # registry versions only
    version: str | None = None
    alias: str | None = None  # the alias followed; None for a pinned version or a run
    metrics: dict[str, str] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)
    since: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Served:
    lm: LoadedModel
    info: ServedInfo


METRIC_TAGS = (tags.TEST_DICE, tags.VAL_DICE, tags.CHAMPION_TEST_DICE)
LINEAGE_TAGS = (tags.TRAINING_RUN_ID, tags.GIT_COMMIT, tags.DVC_STORE_MD5, tags.STORE_DIGEST, tags.CONFIG_HASH)


def load_served(uri: str, device: str = "auto") -> Served:
    """Load a model (weights and spec only, see `tracking.models.load_model`) and describe it; for models:/
    URIs the registry version, tags and lineage."""
    lm = load_model(uri, device)
    s = lm.spec
    pre = {"window": list(s.window), "size": list(s.size), "mean": s.mean, "std": s.std}
    info = ServedInfo(uri, pre | {"in_channels": s.in_channels, "orientation": s.orientation})
    mv, ref = lm.version, parse_model_uri(uri)
    if mv is not None:
        info.name, info.version, info.alias = mv.name, str(mv.version), ref.alias if ref else None
        info.metrics = {k: mv.tags[k] for k in METRIC_TAGS if k in mv.tags}
        info.lineage = {k: mv.tags[k] for k in LINEAGE_TAGS if k in mv.tags}
    return Served(lm, info)


class Events(Protocol):
    """What a holder reports (`serving.metrics.Metrics` implements it)."""

    def loaded(self, role: str, info: ServedInfo, seconds: float, switched: bool) -> None: ...
    def load_failed(self, role: str, seconds: float) -> None: ...
    def follow_state(self, role: str, degraded: bool) -> None: ...


class NoEvents:
    def loaded(self, role: str, info: ServedInfo, seconds: float, switched: bool) -> None:
        pass

    def load_failed(self, role: str, seconds: float) -> None:
        pass

    def follow_state(self, role: str, degraded: bool) -> None:
        pass


@dataclass
class Failure:
    """Why the holder does not serve what its URI names: a version that failed to load (retried at
    `retry_at`, monotonic seconds) or, with `version` None, an alias check or first load that failed."""

    version: str | None
    error: str
    attempts: int
    retry_at: float

    def reason(self, uri: str, serving: str | None) -> str:
        wait = max(0.0, self.retry_at - time.monotonic())
        what = f"cannot load v{self.version} of {uri}" if self.version else f"cannot follow {uri}"
        kept = f"; still serving v{serving}" if serving else ""
        return f"{what}: {self.error}{kept}; attempt {self.attempts}, next in {wait:.0f} s"


class ModelHolder:
    """The current model; `reload` builds the new one first, then swaps the reference atomically.

    In-flight requests keep the `Served` object they started with, so a swap drops none. For a
    `models:/NAME@ALIAS` URI a follower thread re-resolves the alias every `poll_s` seconds (0: never)
    and whenever `wake` is called (the webhook), and loads the version it names if that is not the one
    served. `required`: the first load must succeed (the champion); else (the shadow) the holder may
    start empty (`current` None) and keeps trying.
    """

    def __init__(
        self,
        uri: str,
        device: str = "auto",
        role: str = "champion",
        events: Events | None = None,
        required: bool = True,
        retry_max_s: float = 600.0,
    ):
        self.uri, self.device, self.role, self.ref = uri, device, role, parse_model_uri(uri)
        self.events, self.retry_max_s, self.base_s = events or NoEvents(), retry_max_s, 30.0
        self._reload_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.current: Served | None = None
        self.failure: Failure | None = None
        try:
            self.current = self._load(None)
        except Exception:  # recorded in self.failure by _load
            if required:
                raise

    def serves(self, name: str, alias: str) -> bool:
        """Whether an alias event for (name, alias) concerns this holder's model URI."""
        return self.ref is not None and (self.ref.name, self.ref.alias) == (name, alias)

    @property
    def version(self) -> str | None:
        return self.current.info.version if self.current else None

    def status(self) -> tuple[str, str | None]:
        """("ok", None) or ("degraded", why): the URI names something this holder cannot serve."""
        f = self.failure
        return ("degraded", f.reason(self.uri, self.version)) if f else ("ok", None)

    def _load(self, version: str | None) -> Served:
        """Load the URI now; on success it answers from here on, on failure the failure is recorded."""
        with self._reload_lock:
            t0 = time.monotonic()
            try:
                new = load_served(self.uri, self.device)
            except Exception as e:
                self.events.load_failed(self.role, time.monotonic() - t0)
                self._failed(version, e)
                raise
            self.events.loaded(self.role, new.info, time.monotonic() - t0, self.current is not None)
            new.info.since = utc_now()
            self.current, self.failure = new, None  # in-flight requests keep the object they started with
            self.events.follow_state(self.role, False)
            return new

    def _failed(self, version: str | None, e: Exception) -> None:
        f = self.failure
        attempts = f.attempts + 1 if f is not None and f.version == version else 1
        delay = min(self.retry_max_s, self.base_s * 2 ** (attempts - 1))
        self.failure = Failure(version, one_line(e), attempts, time.monotonic() + delay)
        self.events.follow_state(self.role, True)

    def reload(self) -> dict[str, Any]:
        """Load what the URI names now, whatever the backoff says (POST /reload, SIGHUP)."""
        old = self.version
        new = self._load(None)
        return {"previous_version": old, "version": new.info.version}

    def check(self) -> bool:
        """Re-resolve the alias (one registry call) and load the version it names unless it is served or
        failed less than its backoff ago. True when another version now answers."""
        if self.current is not None and (self.ref is None or self.ref.alias is None):
            return False  # a pinned version or a run: nothing to follow
        version = None
        if self.ref is not None and self.ref.alias is not None:
            try:
                version = str(resolve_version(client(), self.uri).version)
            except Exception as e:  # the registry may be down for a while: keep serving, say so
                self._failed(None, e)
                return False
            if version == self.version:
                if self.failure is not None:
                    self.failure = None
                    self.events.follow_state(self.role, False)
                return False
        f = self.failure
        if f is not None and f.version == version and time.monotonic() < f.retry_at:
            return False  # failed before: wait out its backoff
        self._load(version)
        return True

    def wake(self) -> None:
        self._wake.set()

    def follow(self, poll_s: float) -> threading.Thread:
        """Start the follower thread (daemon); `stop` ends it."""
        self.base_s = poll_s or self.base_s  # retries of a failed version start at one poll and double
        thread = threading.Thread(target=self._follow, args=(poll_s,), name=f"{self.role}-follower", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _follow(self, poll_s: float) -> None:
        while not self._stop.is_set():
            waits = [poll_s] if poll_s > 0 else []
            if self.failure is not None:
                waits.append(max(0.05, self.failure.retry_at - time.monotonic()))
            self._wake.wait(min(waits) if waits else None)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self.check():
                    print(f"{self.role}: now v{self.version} of {self.uri}", flush=True)
            except Exception:  # recorded in self.failure (status, /health, /model, metrics)
                pass
