"""Approval requests: who may not move the champion asks someone who may.

`liverseg promote --request --reason TEXT` (a scientist, or a release user who wants a second pair of
eyes) runs the gate on `<name>-candidates@challenger` and, if it passes, files a request with the
gate's numbers: a chained record `liverseg.request.<seq>` on `<name>-candidates`, where scientists may
write (`tracking.chain`; the server's guard keeps them append-only). `liverseg requests` lists the
pending ones. A release user approves (`promote --approve ID`: the gate runs again on the requested
candidate, and the promotion's history record names the request and its author) or declines
(`promote --decline ID --reason TEXT`: a history record that moves nothing). Nobody approves their own
request: refused here and, on a team server, by the guard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from liverseg.core.clock import utc_now
from liverseg.core.config import PromoteSection
from liverseg.core.errors import PermissionRefused, RegistryError
from liverseg.registry.champion import alias_version
from liverseg.registry.history import append, check_record_fits, history, printable
from liverseg.registry.promote import Decision, _Lock, _score, case_scorer, check_reason, promote
from liverseg.registry.served import Scored
from liverseg.registry.team import check_can_change
from liverseg.tracking import tags
from liverseg.tracking.chain import Record, read_chain
from liverseg.tracking.runs import author as who
from liverseg.tracking.runs import client as mlflow_client
from liverseg.tracking.tags import CHALLENGER, CHAMPION, REQUEST_PREFIX, candidate_model


@dataclass
class Request:
    """A request to promote candidate version `candidate`, with the gate's numbers when it was filed."""

    id: str
    candidate: str
    by: str
    at: str
    reason: str
    champion_version: str | None = None
    test_dice: float | None = None
    champion_test_dice: float | None = None
    gate: dict[str, str] = field(default_factory=dict)
    status: str = "pending"  # pending | approved by X | declined by X

    def line(self, model: str) -> str:
        g = self.gate
        diff = (
            f"diff {float(g[tags.GATE_DIFF_MEAN]):+.4f} CI [{float(g[tags.GATE_DIFF_CI_LOW]):+.4f}, "
            f"{float(g[tags.GATE_DIFF_CI_HIGH]):+.4f}]"
            if g.get(tags.GATE_DIFF_MEAN)
            else "no champion"
        )
        return (
            f"{self.at}  request  {printable(model)}: #{self.id} candidate v{printable(self.candidate)} by "
            f"{printable(self.by)} ({printable(self.status)}); gate {printable(g.get(tags.GATE_RULE, '-'))} {diff} "
            f"n={printable(g.get(tags.GATE_N_CASES, '-'))}; reason: {printable(self.reason) or '-'}"
        )


def all_requests(client: Any, name: str) -> list[Request]:
    """Every request on `<name>-candidates`, oldest first, with its status from `name`'s history."""
    from mlflow.exceptions import MlflowException

    try:
        model_tags = client.get_registered_model(candidate_model(name)).tags or {}
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []  # nothing registered yet
        raise
    try:
        records, _ = history(client, name)
    except RegistryError:  # nothing served yet: every request is pending
        records = []
    decided = {r.request: r for r in records if r.request}
    out = []
    for e in read_chain(model_tags, REQUEST_PREFIX).entries:
        v = e.values
        req = Request(
            str(e.seq),
            str(v.get("candidate", "")),
            str(v.get("by", "")),
            str(v.get("at", "")),
            str(v.get("reason", "")),
        )
        req.champion_version, req.gate = v.get("champion_version"), dict(v.get("gate") or {})
        req.test_dice, req.champion_test_dice = v.get("test_dice"), v.get("champion_test_dice")
        if req.id in decided:
            r = decided[req.id]
            req.status = f"{'declined' if r.action == 'decline' else 'approved'} by {r.by}"
        out.append(req)
    return out


def pending(client: Any, name: str) -> list[Request]:
    return [r for r in all_requests(client, name) if r.status == "pending"]


def _find(client: Any, name: str, request_id: str) -> Request:
    found = [r for r in all_requests(client, name) if r.id == str(request_id).lstrip("#")]
    if not found:
        raise RegistryError(f"{candidate_model(name)}: no request {request_id} (`liverseg requests` lists them)")
    if found[0].status != "pending":
        raise RegistryError(f"request {found[0].id}: already {found[0].status}")
    return found[0]


def file_request(
    store_path: str,
    name: str = tags.SERVED_MODEL,
    reason: str = "",
    raw: str | Path | None = None,
    settings: PromoteSection | None = None,
    scorer=None,
    split: str = "test",
) -> tuple[Request | None, Any]:
    """Run the gate on `<name>-candidates@challenger` against the champion; if it passes, file a request.
    Returns (the request or None, the gate result)."""
    s = settings or PromoteSection()
    check_reason(reason)
    if not reason.strip():
        raise RegistryError("--request needs --reason TEXT: why this candidate should be served")
    cand = candidate_model(name)
    check_can_change(cand, f"ask for the promotion of {cand}")
    client = mlflow_client()
    chal = alias_version(client, cand, CHALLENGER)
    if chal is None:
        raise RegistryError(f"{cand}: no '{CHALLENGER}' alias; run `liverseg register` first")
    champ = alias_version(client, name, CHAMPION)
    if champ is not None and champ.tags.get(tags.CANDIDATE_VERSION) == str(chal.version):
        raise RegistryError(f"{cand} v{chal.version} is already champion ({name} v{champ.version}); nothing to request")
    with Scored(client, f"models:/{cand}/{chal.version}") as scored:
        result, chal_dice, champ_dice = _score(
            client, name, scored, champ, scorer or case_scorer(store_path, split, raw), s
        )
    if not result.passed:
        return None, result
    values = {
        "candidate": str(chal.version), "by": who(), "at": utc_now(), "reason": reason, "gate": result.tags(),
        "test_dice": chal_dice, "champion_test_dice": champ_dice,
        "champion_version": str(champ.version) if champ else None,
    }  # fmt: skip
    seq, _ = append(client, cand, values, REQUEST_PREFIX)
    return _find(client, name, str(seq)), result


def approve(store_path: str, name: str, request_id: str, reason: str = "", **gate: Any) -> Decision:
    """Promote the candidate of pending request `request_id` through the gate (run again, by the
    approver); the history record names the request and who made it. `gate`: `promote`'s options."""
    check_can_change(name, f"approve requests for {name}")
    client = mlflow_client()
    req = _find(client, name, request_id)
    if req.by == who():
        raise PermissionRefused(f"refused: {who()} may not approve request {req.id}: they made it themselves")
    why = reason or f"approves request {req.id} of {req.by}: {req.reason}"
    return promote(store_path, name, reason=why, candidate=req.candidate, request=req, **gate)


def decline(name: str, request_id: str, reason: str) -> Record:
    """Decline pending request `request_id`: a history record that moves nothing, with `reason`."""
    check_reason(reason)
    if not reason.strip():
        raise RegistryError("--decline needs --reason TEXT: why the candidate is not promoted")
    check_can_change(name, f"decline requests for {name}")
    client = mlflow_client()
    with _Lock(name):
        req = _find(client, name, request_id)
        champ = alias_version(client, name, CHAMPION)
        now = str(champ.version) if champ else None
        record = Record("decline", name, now, now, who(), utc_now(), reason, candidate=req.candidate, request=req.id)
        record.requested_by, record.gate = req.by, req.gate
        check_record_fits(record)
        record.seq, _ = append(client, name, record.values())
        return record
