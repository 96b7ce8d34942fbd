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


def history(client: Any, model: str) -> list[Change]:
    """Every recorded change of `model`'s champion, newest first."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(model).tags
    except MlflowException as e:  # not found, or refused
        raise RegistryError(f"{model}: no history ({e.error_code}: {str(e.message).splitlines()[0]})") from None
    changes = [Change(**json.loads(v)) for k, v in tags.items() if k.startswith(TAG_PREFIX)]
    return sorted(changes, key=lambda c: c.at, reverse=True)
