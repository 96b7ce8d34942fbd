"""A search's results, the file `liverseg tune` hands to the next stages (`tune-results.json`, a DVC
output): its schema, writer and reader (the one reader: `evaluate --model-from`, `register --best-of-tune`).

    {"format": "liverseg-search-results", "format_version": 1, "metric": "val_dice", "mode": "max",
     "experiment": ..., "parent_run_id": ..., "best": TRIAL, "best_val_dice": ..., "trials": [TRIAL, ...]}

TRIAL: trial_id, status (completed | early-stopped | failed), epochs, val_dice (null: none reported),
params (the sampled keys), run_id, model_uri (null: no model logged), checkpoint, error.
Files written before the format keys existed read as version 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from liverseg.core.errors import InputError
from liverseg.core.files import atomic_write_json
from liverseg.core.limits import MAX_METADATA_BYTES

FORMAT = "liverseg-search-results"
FORMAT_VERSION = 1
STATUSES = ("completed", "early-stopped", "failed")


def _text(v: Any) -> bool:
    return isinstance(v, str)


def _optional_text(v: Any) -> bool:
    return v is None or isinstance(v, str)


_TRIAL_FIELDS = {  # what each field of a trial read back must be
    "trial_id": _text,
    "status": _text,
    "epochs": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "val_dice": lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
    "params": lambda v: isinstance(v, dict),
    "run_id": _optional_text,
    "model_uri": _optional_text,
    "checkpoint": _optional_text,
    "error": _optional_text,
}


@dataclass
class TrialResult:
    """One trial of a search: its outcome and where its MLflow run and model are."""

    trial_id: str
    status: str  # completed | early-stopped | failed
    epochs: int  # epochs it ran
    val_dice: float  # best validation Dice it reported; NaN when it reported none
    params: dict[str, Any] = field(default_factory=dict)  # the sampled training keys
    run_id: str | None = None
    model_uri: str | None = None  # a model to register: only a trial that ran every epoch has one
    checkpoint: str | None = None
    error: str | None = None  # the root cause of a failed trial, one line

    @property
    def scored(self) -> bool:
        return not math.isnan(self.val_dice)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["val_dice"] = self.val_dice if self.scored else None  # JSON has no NaN
        return d

    @classmethod
    def from_json(cls, d: Any) -> TrialResult:
        """A trial as written by `to_json`; ValueError naming the field when one has the wrong type."""
        if not isinstance(d, dict):
            raise ValueError(f"a trial is a {type(d).__name__}, not an object")
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for key, ok in _TRIAL_FIELDS.items():
            if key in d and not ok(d[key]):
                raise ValueError(f"trial {str(d.get('trial_id'))[:40]}: {key} {str(d[key])[:40]!r} has the wrong type")
        if d.get("status") not in STATUSES:
            raise ValueError(
                f"trial {str(d.get('trial_id'))[:40]}: status {str(d.get('status'))[:40]!r} not in {STATUSES}"
            )
        d["val_dice"] = float("nan") if d.get("val_dice") is None else float(d["val_dice"])
        return cls(**d)


@dataclass
class SearchResults:
    """A finished search: its MLflow parent run and its trials, best first."""

    parent_run_id: str
    metric: str
    mode: str  # max | min
    experiment: str = ""
    trials: list[TrialResult] = field(default_factory=list)

    @property
    def best(self) -> TrialResult:
        """The best trial that logged a model (an early-stopped one cannot be registered)."""
        return next((t for t in self.trials if t.model_uri), self.trials[0])

    def to_json(self) -> dict[str, Any]:
        best = self.best.to_json()
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "metric": self.metric,
            "mode": self.mode,
            "experiment": self.experiment,
            "parent_run_id": self.parent_run_id,
            "best": best,
            "best_val_dice": best["val_dice"],
            "trials": [t.to_json() for t in self.trials],
        }


def write_results(path: str | Path, results: SearchResults) -> None:
    atomic_write_json(path, results.to_json())


def read_results(path: str | Path) -> SearchResults:
    """Read and check a results file; InputError in one line naming the file and what is wrong."""
    try:
        size = Path(path).stat().st_size
        d = json.loads(Path(path).read_bytes()) if size <= MAX_METADATA_BYTES else None
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: not a readable search results file ({type(e).__name__})") from None
    if size > MAX_METADATA_BYTES:
        raise InputError(f"{path}: larger than {MAX_METADATA_BYTES} bytes: not a search results file")
    if not isinstance(d, dict) or d.get("format", FORMAT) != FORMAT:
        shown = str(d.get("format"))[:40] if isinstance(d, dict) else f"a JSON {type(d).__name__}"
        raise InputError(f"{path}: not a liverseg search results file (format {shown!r})")
    if d.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        shown = str(d.get("format_version"))[:20]
        raise InputError(f"{path}: format_version {shown!r}, this liverseg reads {FORMAT_VERSION}")
    try:
        if not isinstance(d["trials"], list) or not d["trials"]:
            raise ValueError("trials is not a non-empty list")
        trials = [TrialResult.from_json(t) for t in d["trials"]]
        head = [d["parent_run_id"], d["metric"], d["mode"], d.get("experiment", "")]
        if not all(isinstance(v, str) for v in head):
            raise ValueError("parent_run_id, metric, mode and experiment must be text")
        return SearchResults(*head, trials)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: malformed search results ({type(e).__name__}: {str(e)[:200]})") from None
