"""Whether a served version is one the gate put there: what a replica checks before serving a version of
`models:/NAME@champion` (a bypass is reported in `/model` and `/metrics`), and what
`liverseg history --verify` checks of the current champion.

A version was put there by the gate when the last record of its model's history chain
(`tracking.chain`) made it champion and the version carries that decision: the gate's tags, and the
sha256 of the files the record names. An alias moved around `liverseg promote` (MLflow's UI or API by
an admin, or a server without liverseg's guard) fails the first check; files or digests changed after
the promotion fail the last. A champion promoted before the chain existed (liverseg 0.2) is accepted
on its legacy record alone, until the next promotion or rollback writes the first chained record.
"""

from __future__ import annotations

from typing import Any

from liverseg.tracking import tags
from liverseg.tracking.chain import Record, history_head

PROMOTED = "promoted"  # the promotion_decision tag of a version the gate let through


def served_by_gate(model_version: Any, head: Record | None) -> str | None:
    """None when `model_version` (an MLflow ModelVersion of the served model) is the one the history
    record `head` made champion and carries the gate's decision and the recorded digests; otherwise one
    line saying why not."""
    mv_tags = model_version.tags or {}
    version, name = str(model_version.version), model_version.name
    if head is None:
        return f"{name} v{version}: no history record made it champion (moved outside `liverseg promote`)"
    if head.model != name or head.to_version != version:
        return (
            f"{name} v{version}: the last history record ({head.seq:06d}, {head.action} by {head.by}) made "
            f"v{head.to_version} champion, not v{version} (moved outside `liverseg promote`)"
        )
    if not head.seq:  # promoted before the chain (liverseg 0.2): its record names it; no digests were kept
        return None
    if mv_tags.get(tags.PROMOTION_DECISION) != PROMOTED or not mv_tags.get(tags.GATE_RULE):
        return f"{name} v{version}: carries no gate decision (tags {tags.PROMOTION_DECISION}, {tags.GATE_RULE})"
    for tag, recorded in ((tags.WEIGHTS_SHA256, head.weights_sha256), (tags.SPEC_SHA256, head.spec_sha256)):
        if not recorded or mv_tags.get(tag) != recorded:
            return f"{name} v{version}: tag {tag} differs from the digest history record {head.seq:06d} recorded"
    return None


def check_served(client: Any, model_version: Any) -> str | None:
    """`served_by_gate` against the served model's history as the registry holds it now (one call)."""
    rm = client.get_registered_model(model_version.name)
    return served_by_gate(model_version, history_head(rm.tags or {}, tags.HISTORY_PREFIX))
