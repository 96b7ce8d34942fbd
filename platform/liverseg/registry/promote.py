"""Promote: `<name>-candidates@challenger` becomes `<name>@champion` only behind the gate; roll back.

Aliases (`challenger`, `champion`), not the deprecated stages. Versions are registered into
`<name>-candidates` (alias `challenger`); promotion copies the winner into `<name>`, where `champion`
lives and serving looks (`models:/<name>@champion`): two registered models so that the tracking
server's per-model permissions separate who may add candidates from who may change what is served
(`team`). Every decision is written as tags on the challenger's version; the version that becomes
champion records the champion it replaced, which is what `rollback` returns to; every champion change
joins the history (`history`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from liverseg.core import env
from liverseg.core.clock import utc_now
from liverseg.core.errors import RegistryError
from liverseg.registry.history import Change, record
from liverseg.registry.modelcard import TEST_GRID, update_descriptions
from liverseg.registry.register import wait_ready
from liverseg.registry.team import check_can_change
from liverseg.tracking import tags
from liverseg.tracking.models import load_model
from liverseg.tracking.runs import author as who
from liverseg.tracking.runs import client as mlflow_client
from liverseg.tracking.runs import failure, not_found, tracking_uri
from liverseg.tracking.tags import CHALLENGER, CHAMPION, candidate_model


def _alias(client, name: str, alias: str):
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
    return version_tags.get(tags.TEST_DICE) or version_tags.get(tags.TEST_DICE_STORE_GRID)


@dataclass
class Decision:
    name: str
    challenger: str
    champion_before: str | None
    champion_after: str | None
    challenger_dice: float
    champion_dice: float | None
    promoted: bool
    reason: str
    grid: str = TEST_GRID

    def line(self) -> str:
        champ = f"v{self.champion_before} {self.champion_dice:.4f}" if self.champion_before else "none"
        verdict = "PROMOTED" if self.promoted else "KEPT"
        return (
            f"{verdict}: {self.name} test Dice ({self.grid}): challenger v{self.challenger} "
            f"{self.challenger_dice:.4f}; champion before: {champ}; champion now: v{self.champion_after}; {self.reason}"
        )


class _Lock:
    """An exclusive lock per (tracking store, model name): promotions on one host are serialised."""

    def __init__(self, name: str):
        from filelock import FileLock

        digest = hashlib.sha256(f"{tracking_uri()}|{name}".encode()).hexdigest()[:16]
        d = env.lock_dir()
        d.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(d / f"{digest}.lock"))

    def __enter__(self):
        self.lock.acquire(timeout=600)
        return self

    def __exit__(self, *exc):
        self.lock.release()


def promote(
    store_path: str,
    name: str = tags.SERVED_MODEL,
    min_dice: float = 0.9,
    margin: float = 0.0,
    split: str = "test",
    scorer=None,
    reason: str = "",
    raw: str | Path | None = None,
) -> Decision:
    """Evaluate `<name>-candidates@challenger` and `<name>@champion` on the same split; only if the
    challenger passes the floor and beats the champion by `margin` (strictly), copy it into `name` and
    move `champion` there. Decision, scores and reason become tags; a champion change joins the history
    with `reason` (who, when, from, to, scores). A user without EDIT on `name` is refused before the gate.

    `raw`: the LiTS NIfTI folder, so that the gate scores on each volume's original grid (the one test
    Dice, tagged `test_dice`); without it the store grid, tagged and labelled as such.
    `scorer(LoadedModel) -> mean test Dice` defaults to `evaluate` on the store (tests may pass a cheaper
    one). The bytes the gate scored are the bytes served: their sha256 become the served copy's tags,
    which only release users can write (a candidate's files or tags changed later then refuse to load).
    """
    from liverseg.registry.evaluate import evaluate

    scorer = scorer or (lambda lm: evaluate(lm.uri, store_path, split, raw, lm=lm).summary["dice"]["mean"])
    dice_tag, grid = (tags.TEST_DICE, TEST_GRID) if raw else (tags.TEST_DICE_STORE_GRID, "store grid, not LiTS")
    check_can_change(name, f"promote {name}")
    client, cand = mlflow_client(), candidate_model(name)
    with _Lock(name):  # compare-and-set: nobody moves the champion between our read and our write
        chal = _alias(client, cand, CHALLENGER)
        if chal is None:
            raise RegistryError(f"{cand}: no '{CHALLENGER}' alias; run `liverseg register` first")
        champ = _alias(client, name, CHAMPION)
        if champ is not None and champ.tags.get(tags.CANDIDATE_VERSION) == str(chal.version):
            recorded = tags.number(champ.tags.get(dice_tag))
            dice = float("nan") if recorded is None else recorded
            v = str(champ.version)
            return Decision(name, str(chal.version), v, v, dice, dice, False, "challenger is already champion", grid)
        scored = load_model(f"models:/{cand}/{chal.version}")
        chal_dice, pinned = float(scorer(scored)), scored.sha256
        del scored
        champ_dice = float(scorer(load_model(f"models:/{name}/{champ.version}"))) if champ else None
        ok, why = _gate(chal_dice, champ_dice, min_dice, margin)
        served = _served_copy(client, name, str(chal.version), pinned) if ok else None
        scores = {dice_tag: f"{chal_dice:.6f}", tags.TEST_DICE_GRID: grid}
        for k, v in _decision_tags(ok, why, scores, champ_dice, champ).items():  # the served copy carries them
            client.set_model_version_tag(cand, chal.version, k, v)
        before = str(champ.version) if champ else None
        after = before
        if ok:
            after = _crown(client, name, str(chal.version), before, pinned, served)
            change = Change(
                "promote", name, before, after, who(), utc_now(), reason, chal_dice, champ_dice, str(chal.version)
            )
            record(client, change)
            update_descriptions(client, name, after)
        update_descriptions(client, cand, str(chal.version))
        return Decision(name, str(chal.version), before, after, chal_dice, champ_dice, ok, why, grid)


def _decision_tags(ok: bool, why: str, scores: dict[str, str], champ_dice: float | None, champ) -> dict[str, str]:
    return {
        tags.PROMOTION_DECISION: "promoted" if ok else "rejected",
        **scores,
        tags.CHAMPION_TEST_DICE: "" if champ_dice is None else f"{champ_dice:.6f}",
        tags.PROMOTION_REASON: why,
        tags.DECIDED_AT: utc_now(),
        tags.DECIDED_BY: who(),
        tags.COMPARED_WITH: str(champ.version) if champ else "",
    }


def _gate(chal_dice: float, champ_dice: float | None, min_dice: float, margin: float) -> tuple[bool, str]:
    if chal_dice < min_dice:
        return False, f"below the floor {min_dice}"
    if champ_dice is not None and not chal_dice > champ_dice + margin:
        return False, f"does not beat the champion by more than {margin}"
    return True, "first champion" if champ_dice is None else f"beats the champion by more than {margin}"


def _served_copy(client, name: str, candidate: str, pinned: dict[str, str]):
    """The version of `name` that candidate `candidate` was copied to before, if any; refused when the
    files the gate just scored are not the ones that copy is pinned to."""
    found = [
        mv
        for mv in client.search_model_versions(f"name = '{name}'")
        if mv.tags.get(tags.CANDIDATE_VERSION) == candidate
    ]
    if found and any(found[0].tags.get(tag) != digest for tag, digest in pinned.items()):
        raise RegistryError(
            f"{candidate_model(name)} v{candidate}: its files differ from those served before as {name} "
            f"v{found[0].version}; champion kept (register the model again)"
        )
    return found[0] if found else None


def _crown(client, name: str, candidate: str, before: str | None, pinned: dict[str, str], served) -> str:
    """Move `champion` onto `served` (the candidate's earlier copy) or onto a new copy of candidate version
    `candidate` in `name`, pinned to the sha256 of the files the gate scored. Returns the served version."""
    if served is not None:
        version = str(served.version)
    else:
        version = str(client.copy_model_version(f"models:/{candidate_model(name)}/{candidate}", name).version)
        wait_ready(client, name, version)
        for tag, value in {tags.CANDIDATE_VERSION: candidate, **pinned}.items():
            client.set_model_version_tag(name, version, tag, value)
    client.set_model_version_tag(name, version, tags.PREVIOUS_CHAMPION, before or "")
    client.set_registered_model_alias(name, CHAMPION, version)
    return version


def rollback(name: str = tags.SERVED_MODEL, reason: str = "") -> tuple[str, str]:
    """Put `champion` back on the champion it replaced; joins the history with `reason`.
    Returns (from version, to version)."""
    check_can_change(name, f"roll back {name}")
    client = mlflow_client()
    with _Lock(name):
        champ = _alias(client, name, CHAMPION)
        if champ is None:
            raise RegistryError(f"{name}: no champion to roll back")
        prev = champ.tags.get(tags.PREVIOUS_CHAMPION, "")
        if not prev:
            raise RegistryError(f"{name}: champion v{champ.version} replaced no earlier champion")
        try:
            client.get_model_version(name, prev)
        except Exception as e:  # deleted since (RESOURCE_DOES_NOT_EXIST), or the registry went away
            err = failure(e, f"{name} v{prev}")
            if isinstance(err, RegistryError):
                err = RegistryError(
                    f"{name}: cannot roll back to v{prev}, the champion before v{champ.version} (deleted since); "
                    "champion kept"
                )
            raise err from None
        client.set_registered_model_alias(name, CHAMPION, prev)
        client.set_model_version_tag(name, champ.version, tags.ROLLED_BACK_AT, utc_now())
        dice = {v: gate_dice(client.get_model_version(name, v).tags) for v in (prev, str(champ.version))}
        score = {v: tags.number(d) for v, d in dice.items()}
        change = Change(
            "rollback", name, str(champ.version), prev, who(), utc_now(), reason, score[prev], score[str(champ.version)]
        )
        record(client, change)
        return str(champ.version), prev
