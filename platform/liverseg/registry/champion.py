"""Moving `champion`, the one way liverseg does it: record, then move, then mark, each step repeatable.

`crown` appends the history record (the tracking server's guard lets exactly one record take each
number), moves the alias (the guard allows only the move the last record names), then writes the
champion's tags and rewrites the cards (`finish`). `complete_pending` finishes a change whose record
was written but whose move or marks were not (a crash, a database outage in between), and refuses,
naming it, a champion that no record accounts for (moved around `liverseg promote`).
"""

from __future__ import annotations

from typing import Any

from liverseg.core.clock import utc_now
from liverseg.core.errors import RegistryError
from liverseg.registry.history import append, completed
from liverseg.registry.modelcard import update_descriptions
from liverseg.tracking import tags
from liverseg.tracking.chain import Record, entry_key, history_head
from liverseg.tracking.runs import failure, not_found
from liverseg.tracking.tags import CHAMPION, HISTORY_PREFIX


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The version `alias` points at, None when the model or the alias does not exist. Any other failure
    (timeout, 5xx, 401, 403) is raised, saying what failed: read as "no champion", it would let a
    challenger in unopposed."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception as e:
        if not_found(e):
            return None
        raise failure(e, f"{name}@{alias}") from None


def gate_dice(version_tags: dict[str, str]) -> str | None:
    """The score the gate gave a version: the LiTS test Dice, else a store-grid one (promote without --raw)."""
    return (version_tags or {}).get(tags.TEST_DICE) or (version_tags or {}).get(tags.TEST_DICE_STORE_GRID)


def crown(client: Any, name: str, record: Record) -> None:
    """Append `record` (its `to_version` set), move `champion` to it, mark the version, rewrite the cards."""
    record.seq, _ = append(client, name, record.values())
    client.set_registered_model_alias(name, CHAMPION, record.to_version)
    finish(client, name, record)


def finish(client: Any, name: str, record: Record) -> None:
    """The champion's own tags (who, when, from, why, which record) and the cards, after the move."""
    marks = {
        tags.CHAMPION_BY: record.by,
        tags.CHAMPION_AT: record.at,
        tags.CHAMPION_FROM: record.from_version or "",
        tags.CHAMPION_REASON: record.reason,
        tags.HISTORY_SEQ: str(record.seq),
    }
    if record.action == "promote":
        marks[tags.PREVIOUS_CHAMPION] = record.from_version or ""  # what `rollback` returns to
    for k, v in marks.items():
        client.set_model_version_tag(name, record.to_version, k, v)
    if record.action == "rollback" and record.from_version:
        client.set_model_version_tag(name, record.from_version, tags.ROLLED_BACK_AT, utc_now())
    update_descriptions(client, name, record.to_version)


def complete_pending(client: Any, name: str) -> str:
    """Finish the last recorded change of `name` if it was left half done; returns a note saying what was
    completed ("" when nothing was pending). Raises, naming it, when `champion` is somewhere no record put
    it (the card says so too)."""
    try:
        model_tags = client.get_registered_model(name).tags or {}
    except Exception as e:
        if not_found(e):
            return ""  # nothing served yet
        raise failure(e, name) from None
    head = history_head(model_tags, HISTORY_PREFIX)
    champ = alias_version(client, name, CHAMPION)
    version = str(champ.version) if champ is not None else None
    if head is None or not head.seq or head.action == "decline":
        return ""  # nothing recorded by the chain yet, or the last record moved nothing
    key = entry_key(HISTORY_PREFIX, head.seq)
    if version == head.to_version:
        if (champ.tags or {}).get(tags.HISTORY_SEQ) == str(head.seq):
            return ""
        finish(client, name, head)
        return f"completed the marks of the {head.action} recorded as {key}"
    if version == head.from_version and not completed(client, head):
        client.set_registered_model_alias(name, CHAMPION, head.to_version)
        finish(client, name, head)
        return f"completed the {head.action} recorded as {key}: champion v{head.from_version} -> v{head.to_version}"
    if version is not None:
        update_descriptions(client, name, version)  # the card names the bypass
    raise RegistryError(
        f"{name}: champion is {'v' + version if version else 'unset'}, but the last history record ({key}, "
        f"{head.action} by {head.by}) made v{head.to_version} champion: it was moved around `liverseg promote`; "
        "nothing done (see `liverseg history --verify`; the admin moves it back)"
    )
