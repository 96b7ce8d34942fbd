"""Promote: `<name>-candidates@challenger` becomes `<name>@champion` only behind the paired gate; roll back.

Aliases (`challenger`, `champion`), not the deprecated stages. Versions are registered into
`<name>-candidates` (alias `challenger`); promotion copies the winner's scored files into `name`
(`served`), where `champion` lives and serving looks: two registered models so that the tracking
server's per-model permissions separate who may add candidates from who may change what is served
(`team`). Every decision is written as tags on the challenger's version (the gate's numbers as `gate.*`).

A champion change is ordered so that it is recorded exactly once whatever fails when: every value is
checked against the server's limits first, then the served copy is made, then the history record is
appended (the server lets one record win per number: a concurrent promotion is refused there), then
the alias moves, then the champion's tags and the cards follow. A failure after the record leaves a
half-done change that the next `promote` or `rollback` completes first (`complete_pending`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liverseg.core import env
from liverseg.core.clock import utc_now
from liverseg.core.config import PromoteSection
from liverseg.core.errors import RegistryError
from liverseg.core.limits import MAX_REASON
from liverseg.registry.champion import alias_version, complete_pending, crown, gate_dice
from liverseg.registry.gate import GateResult, decide, floor_only, paired_differences
from liverseg.registry.history import check_record_fits
from liverseg.registry.modelcard import TEST_GRID, update_descriptions
from liverseg.registry.served import Scored, find_served_copy, lineage_facts, make_served_copy
from liverseg.registry.team import check_can_change
from liverseg.tracking import tags
from liverseg.tracking.chain import Record
from liverseg.tracking.runs import author as who
from liverseg.tracking.runs import client as mlflow_client
from liverseg.tracking.runs import failure, tracking_uri
from liverseg.tracking.shadow import ShadowSummary, read_evidence
from liverseg.tracking.tags import CHALLENGER, CHAMPION, candidate_model

__all__ = ["Decision", "promote", "rollback", "gate_dice"]


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
    gate: GateResult | None = None
    note: str = ""  # a half-done change completed first
    shadow: ShadowSummary | None = None  # the challenger's agreement with this champion on live traffic

    def line(self) -> str:
        champ = f"v{self.champion_before} {self.champion_dice:.4f}" if self.champion_before else "none"
        verdict = "PROMOTED" if self.promoted else "KEPT"
        note = f" ({self.note})" if self.note else ""
        return (
            f"{verdict}: {self.name} test Dice ({self.grid}): challenger v{self.challenger} "
            f"{self.challenger_dice:.4f}; champion before: {champ}; champion now: v{self.champion_after}; "
            f"{self.reason}{note}; "
            + (self.shadow.line() if self.shadow else "no shadow evidence for this challenger against this champion")
        )


class _Lock:
    """An exclusive lock per (tracking store, model name) on this host: promotions from one host queue
    here; across hosts the tracking server's guard lets one history record win."""

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


def check_reason(reason: str) -> None:
    if len(reason) > MAX_REASON:
        raise RegistryError(f"--reason: {len(reason)} characters, at most {MAX_REASON}")


def _settings(settings: PromoteSection | None, **given: Any) -> PromoteSection:
    s = settings or PromoteSection()
    return s.model_copy(update={k: v for k, v in given.items() if v is not None})


def case_scorer(store_path: str, split: str, raw: str | Path | None):
    """The default scorer: per-case Dice (`evaluate`, original grid with `raw`) as {case: Dice or None}."""
    from liverseg.registry.evaluate import evaluate

    return lambda lm: {c["case"]: c["dice"] for c in evaluate(lm.uri, store_path, split, raw, lm=lm).cases}


def promote(
    store_path: str,
    name: str = tags.SERVED_MODEL,
    min_dice: float | None = None,
    margin: float | None = None,
    split: str = "test",
    scorer=None,
    reason: str = "",
    raw: str | Path | None = None,
    rule: str | None = None,
    settings: PromoteSection | None = None,
    candidate: str | None = None,
    request: Any | None = None,
) -> Decision:
    """Score `<name>-candidates@challenger` (or candidate version `candidate`) and `<name>@champion` on the
    same cases; only if the challenger passes the floor and the paired gate (`registry.gate`) does its
    served copy become champion. `settings` (pipelines/promote.yaml) gives the rule, margin, floor and
    bootstrap; the keyword arguments override it. `scorer(LoadedModel) -> {case: Dice}` defaults to
    `evaluate` on the store (on each volume's original grid with `raw`). `request`: the approval request
    this promotion approves (recorded with it). A user without EDIT on `name` is refused before the gate.
    """
    s = _settings(settings, min_dice=min_dice, margin=margin, rule=rule)
    check_reason(reason)
    check_can_change(name, f"promote {name}")
    scorer = scorer or case_scorer(store_path, split, raw)
    grid = TEST_GRID if raw else "store grid, not LiTS"
    client, cand = mlflow_client(), candidate_model(name)
    with _Lock(name):
        note = complete_pending(client, name)
        chal = _challenger(client, cand, candidate)
        champ = alias_version(client, name, CHAMPION)
        if champ is not None and champ.tags.get(tags.CANDIDATE_VERSION) == str(chal.version):
            dice = float(gate_dice(champ.tags) or "nan")
            v = str(champ.version)
            return Decision(
                name, str(chal.version), v, v, dice, dice, False, "challenger is already champion", grid, None, note
            )
        with Scored(client, f"models:/{cand}/{chal.version}") as scored:
            result, chal_dice, champ_dice = _score(client, name, scored, champ, scorer, s)
            d = _decide(client, name, chal, champ, scored, result, (chal_dice, champ_dice), reason, grid, request)
        d.note = note
        return d


def _challenger(client: Any, cand: str, candidate: str | None) -> Any:
    if candidate is None:
        chal = alias_version(client, cand, CHALLENGER)
        if chal is None:
            raise RegistryError(f"{cand}: no '{CHALLENGER}' alias; run `liverseg register` first")
        return chal
    try:
        return client.get_model_version(cand, candidate)
    except Exception as e:
        raise RegistryError(f"{cand} v{candidate}: not found ({type(e).__name__})") from None


def _score(client: Any, name: str, scored: Scored, champ: Any, scorer, s: PromoteSection):
    """(gate result, challenger mean Dice, champion mean Dice or None). The champion's files are scored
    from the registry (digest-checked); the same files as the challenger's are not scored twice."""
    import numpy as np

    chal_cases = scorer(scored.lm)
    chal_dice = float(np.mean([v for v in chal_cases.values() if v is not None] or [np.nan]))
    if champ is None:
        result = floor_only(chal_dice, len(chal_cases), s.min_dice, s.seed, s.resamples, s.confidence)
        return result, chal_dice, None
    if all(champ.tags.get(k) == v for k, v in scored.pinned.items()):
        champ_cases = chal_cases  # a model re-registered from the champion's own run: the same bytes
    else:
        with Scored(client, f"models:/{name}/{champ.version}") as served:
            champ_cases = scorer(served.lm)
    champ_dice = float(np.mean([v for v in champ_cases.values() if v is not None] or [np.nan]))
    diffs = paired_differences(chal_cases, champ_cases)
    result = decide(diffs, s.rule, s.margin, s.seed, s.resamples, s.confidence)
    if not chal_dice >= s.min_dice:
        result.passed, result.why = False, f"below the floor {s.min_dice} (mean {chal_dice:.4f}); {result.why}"
    return result, chal_dice, champ_dice


def _decide(client, name, chal, champ, scored, result, dice, reason, grid, request) -> Decision:
    """Record the decision on the candidate; if it passed, make (or reuse) the served copy and crown it."""
    chal_dice, champ_dice = dice
    dice_tag = tags.TEST_DICE if grid == TEST_GRID else tags.TEST_DICE_STORE_GRID
    decision = {
        tags.PROMOTION_DECISION: "promoted" if result.passed else "rejected",
        dice_tag: f"{chal_dice:.6f}",
        tags.TEST_DICE_GRID: grid,
        tags.TEST_CASES: str(result.n_cases),
        tags.CHAMPION_TEST_DICE: "" if champ_dice is None else f"{champ_dice:.6f}",
        tags.PROMOTION_REASON: result.why,
        tags.DECIDED_AT: utc_now(),
        tags.DECIDED_BY: who(),
        tags.COMPARED_WITH: str(champ.version) if champ else "",
        **result.tags(),
    }
    before, cand = str(champ.version) if champ else None, candidate_model(name)
    shadow = read_evidence(client, cand, str(chal.version), against=before) if before else None
    decision.update(shadow.decision_tags() if shadow else {})
    record = Record(
        "promote", name, before, None, who(), utc_now(), reason, chal_dice, champ_dice, str(chal.version),
        {**result.tags(), **(shadow.decision_tags() if shadow else {})},
        scored.pinned[tags.WEIGHTS_SHA256], scored.pinned[tags.SPEC_SHA256],
        request.id if request else "", request.by if request else "",
    )  # fmt: skip
    check_record_fits(record)  # before the first write
    for k, v in decision.items():
        client.set_model_version_tag(cand, chal.version, k, v)
    outcome = Decision(name, str(chal.version), before, before, chal_dice, champ_dice, False, result.why, grid, result)
    outcome.shadow = shadow
    if result.passed:
        served = find_served_copy(client, name, str(chal.version), scored.pinned)
        facts = {**lineage_facts(client, chal), tags.CANDIDATE_VERSION: str(chal.version), **scored.pinned, **decision}
        served = served or make_served_copy(client, name, chal, scored, facts)
        record.to_version = str(served.version)
        crown(client, name, record)
        outcome.promoted, outcome.champion_after = True, record.to_version
    update_descriptions(client, cand, str(chal.version))
    return outcome


def rollback(name: str = tags.SERVED_MODEL, reason: str = "") -> tuple[str, str]:
    """Put `champion` back on the champion it replaced; joins the history with `reason`.
    Returns (from version, to version)."""
    check_reason(reason)
    check_can_change(name, f"roll back {name}")
    client = mlflow_client()
    with _Lock(name):
        complete_pending(client, name)
        champ = alias_version(client, name, CHAMPION)
        if champ is None:
            raise RegistryError(f"{name}: no champion to roll back")
        prev = champ.tags.get(tags.PREVIOUS_CHAMPION, "")
        if not prev:
            raise RegistryError(f"{name}: champion v{champ.version} replaced no earlier champion")
        try:
            target = client.get_model_version(name, prev)
        except Exception as e:  # deleted since (RESOURCE_DOES_NOT_EXIST), or the registry went away
            err = failure(e, f"{name} v{prev}")
            if isinstance(err, RegistryError):
                err = RegistryError(
                    f"{name}: cannot roll back to v{prev}, the champion before v{champ.version} (deleted since); "
                    "champion kept"
                )
            raise err from None
        t = target.tags or {}
        dice = {v: gate_dice(mv.tags) for v, mv in ((prev, target), (str(champ.version), champ))}
        record = Record(
            "rollback", name, str(champ.version), prev, who(), utc_now(), reason,
            float(dice[prev]) if dice[prev] else None,
            float(dice[str(champ.version)]) if dice[str(champ.version)] else None,
            t.get(tags.CANDIDATE_VERSION, ""), {k: t[k] for k in tags.GATE_TAGS if k in t},
            t.get(tags.WEIGHTS_SHA256, ""), t.get(tags.SPEC_SHA256, ""),
        )  # fmt: skip
        check_record_fits(record)
        crown(client, name, record)
        return str(champ.version), prev
