"""The model a replica serves, and following its alias: load the new version first, then swap the
reference, so in-flight requests finish on the old one and none is dropped."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

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


class ModelHolder:
    """The current model; `reload` builds the new one first, then swaps the reference atomically.

    In-flight requests keep the `Served` object they started with, so a swap drops none. For a
    `models:/NAME@ALIAS` URI a follower thread re-resolves the alias every `poll_s` seconds (0: never)
    and whenever `wake` is called (the webhook), and reloads when the alias points elsewhere.
    """

    def __init__(self, uri: str, device: str = "auto"):
        self.uri, self.device = uri, device
        self._reload_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.current = self._stamped(load_served(uri, device))
        self.last_error: str | None = None

    @staticmethod
    def _stamped(served: Served) -> Served:
        served.info.since = utc_now()
        return served

    def serves(self, name: str, alias: str) -> bool:
        """Whether an alias event for (name, alias) concerns this replica's model URI."""
        return self.current.info.name == name and self.current.info.alias == alias

    def reload(self) -> dict[str, Any]:
        with self._reload_lock:
            new = load_served(self.uri, self.device)
            old = self.current.info.version
            self.current = self._stamped(new)  # in-flight requests keep the object they started with
            return {"previous_version": old, "version": new.info.version}

    def reload_if_moved(self) -> bool:
        """Re-resolve the alias (one registry call); reload only if it names another version."""
        if self.current.info.alias is None:
            return False  # a pinned version or a run: nothing to follow
        mv = resolve_version(client(), self.uri)
        if str(mv.version) == self.current.info.version:
            return False
        self.reload()
        return True

    def wake(self) -> None:
        self._wake.set()

    def follow(self, poll_s: float) -> threading.Thread:
        """Start the follower thread (daemon); `stop` ends it."""
        thread = threading.Thread(target=self._follow, args=(poll_s,), name="alias-follower", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _follow(self, poll_s: float) -> None:
        while not self._stop.is_set():
            self._wake.wait(poll_s or None)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self.reload_if_moved():
                    print(f"now serving v{self.current.info.version} of {self.uri}", flush=True)
                self.last_error = None
            except Exception as e:  # the registry may be down for a while: keep serving, retry next time
                self.last_error = one_line(e)
