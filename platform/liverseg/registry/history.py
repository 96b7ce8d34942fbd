"""Champion history: every change of `champion` (promote, rollback) as one record: who, when, from which
version to which, the gate's numbers and the reason (`liverseg history`, newest first).

Kept where the MLflow UI shows it and where only those allowed to move the champion can write (EDIT on
the served model, see team.py): one tag `liverseg.history.<UTC time>` per change on the served
registered model, its value the record as JSON; and on the version that became champion the tags
`champion_by`, `champion_at`, `champion_from`, `champion_reason`. Works the same on SQLite (one user:
the OS login) and on a server (the basic-auth login, MLFLOW_TRACKING_USERNAME).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from liverseg.core.errors import RegistryError
from liverseg.core.limits import MAX_REASON
from liverseg.tracking import tags
from liverseg.tracking.runs import failure
from liverseg.tracking.tags import HISTORY_PREFIX as TAG_PREFIX


@dataclass
class Change:
    """One move of `champion` on registered model `model`."""

    action: str  # promote | rollback
    model: str
    from_version: str | None  # served version before (None: there was no champion)
    to_version: str
    by: str
    at: str  # UTC, ISO 8601 with microseconds
    reason: str
    test_dice: float | None = None  # the new champion's gate score
    champion_test_dice: float | None = None  # the old champion's, same gate
    candidate: str = ""  # the candidate version promoted (<model>-candidates), if any

    def line(self) -> str:
        def dice(x: float | None) -> str:
            return "-" if x is None else f"{x:.4f}"

        frm = f"v{self.from_version}" if self.from_version else "none"
        cand = f" (candidate v{self.candidate})" if self.candidate else ""
        return (
            f"{self.at}  {self.action:<8} {self.model}: {frm} -> v{self.to_version}{cand} by {self.by}; "
            f"test Dice {dice(self.test_dice)} vs {dice(self.champion_test_dice)}; reason: {self.reason or '-'}"
        )


def record(client: Any, change: Change) -> None:
    """Write `change` on the served model and on the version that became champion."""
    change.reason = change.reason[:MAX_REASON]
    key = TAG_PREFIX + change.at.replace(":", "").replace("-", "")  # tag keys take no ':'
    client.set_registered_model_tag(change.model, key, json.dumps(asdict(change), sort_keys=True))
    for k, v in {
        tags.CHAMPION_BY: change.by,
        tags.CHAMPION_AT: change.at,
        tags.CHAMPION_FROM: change.from_version or "",
        tags.CHAMPION_REASON: change.reason,
    }.items():
        client.set_model_version_tag(change.model, change.to_version, k, v)


def history(client: Any, model: str, skipped: list[str] | None = None) -> list[Change]:
    """Every recorded change of `model`'s champion, newest first. A tag that is not a record (edited by
    hand) is left out, its key appended to `skipped`; a refused login or a server down is an error saying
    so (`runs.failure`)."""
    try:
        found = client.get_registered_model(model).tags
    except Exception as e:
        err = failure(e, model)
        raise (
            RegistryError(f"{model}: no such registered model, no history") if isinstance(err, RegistryError) else err
        ) from None
    changes = []
    for key, value in found.items():
        if key.startswith(TAG_PREFIX):
            change = _parse(value)
            if change is not None:
                changes.append(change)
            elif skipped is not None:
                skipped.append(key)
    return sorted(changes, key=lambda c: c.at, reverse=True)


_TEXT = ("action", "model", "to_version", "by", "at", "reason")


def _parse(value: str) -> Change | None:
    """A history tag's record, None when it is not one (not JSON, other keys, values of other types)."""
    try:
        d = json.loads(value)
        change = Change(**d)
    except (ValueError, TypeError, RecursionError):
        return None
    numbers = (change.test_dice, change.champion_test_dice)
    if not all(isinstance(getattr(change, k), str) for k in _TEXT) or not isinstance(change.candidate, str):
        return None
    if not (change.from_version is None or isinstance(change.from_version, str)):
        return None
    ok = all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in numbers)
    return change if ok else None
