"""The hash chain of history records, and the served-version check replicas make, on plain tag dicts."""

import json
from types import SimpleNamespace

from liverseg.tracking.chain import Record, digest, encode, entry_key, history_head, history_records, read_chain
from liverseg.tracking.gate_marks import served_by_gate

P = "liverseg.history."


def _chain(n: int, legacy: dict[str, str] | None = None) -> dict[str, str]:
    """n chained records moving the champion v1 -> v2 -> ..., as `registry.history.append` writes them."""
    tags = dict(legacy or {})
    for seq in range(1, n + 1):
        chain = read_chain(tags, P)
        rec = Record("promote", "m", str(seq - 1) if seq > 1 else None, str(seq), "rita", f"2026-12-02T10:00:0{seq}Z")
        rec.weights_sha256, rec.spec_sha256 = f"w{seq}", f"s{seq}"
        values = {**rec.values(), "seq": chain.next_seq(), "prev": chain.head_digest()}
        tags[entry_key(P, values["seq"])] = encode(values)
    return tags


def test_an_intact_chain_has_no_problems_and_a_head():
    tags = _chain(3)
    chain = read_chain(tags, P)
    assert [e.seq for e in chain.entries] == [1, 2, 3] and chain.problems() == []
    assert chain.head.key == "liverseg.history.000003" and chain.next_seq() == 4
    assert json.loads(tags["liverseg.history.000002"])["prev"] == digest(tags["liverseg.history.000001"])
    assert history_head(tags, P).to_version == "3"


def test_removed_altered_and_replaced_records_are_named():
    tags = _chain(4)
    gone = {k: v for k, v in tags.items() if k != "liverseg.history.000002"}
    assert read_chain(gone, P).problems()[0].startswith("liverseg.history.000002: missing")
    altered = dict(tags)
    altered["liverseg.history.000002"] = altered["liverseg.history.000002"].replace('"rita"', '"mallory"')
    assert read_chain(altered, P).problems() == [
        "liverseg.history.000003: its prev hash does not match record liverseg.history.000002 "
        "(altered, replaced or removed)"
    ]
    first = dict(tags)
    first["liverseg.history.000001"] = first["liverseg.history.000001"].replace('"1"', '"9"')
    assert "000002: its prev hash does not match record liverseg.history.000001" in read_chain(first, P).problems()[0]


def test_a_malformed_record_is_reported_and_skipped():
    tags = {**_chain(2), "liverseg.history.000003": "{not json", "liverseg.history.000004": "[1, 2]"}
    chain = read_chain(tags, P)
    assert [e.seq for e in chain.entries] == [1, 2]
    assert chain.bad[0].startswith("liverseg.history.000003: not JSON") and "not a JSON object" in chain.bad[1]
    odd = {**_chain(1), "liverseg.history.000002": encode({"seq": 2, "action": "steal"})}
    records, bad = history_records(read_chain(odd, P))
    assert len(records) == 1 and bad[0].startswith("liverseg.history.000002: not a history record")


def test_legacy_records_anchor_the_chain():
    """Records written before the chain (timestamp keys, no prev) are covered by record 1's prev."""
    legacy = {
        "liverseg.history.20261128T091041.004211Z": encode(Record("promote", "m", None, "1", "al", "t1").values())
    }
    tags = _chain(2, legacy)
    assert json.loads(tags["liverseg.history.000001"])["prev"] == digest(encode(legacy))
    assert read_chain(tags, P).problems() == []
    tags.pop("liverseg.history.20261128T091041.004211Z")
    assert "000001: its prev hash does not match the start of the chain" in read_chain(tags, P).problems()[0]
    only_legacy = history_head(legacy, P)
    assert only_legacy.seq == 0 and only_legacy.to_version == "1"


def _version(version: str, **tags) -> SimpleNamespace:
    base = {"promotion_decision": "promoted", "gate.rule": "superior", "liverseg.weights_sha256": f"w{version}"}
    return SimpleNamespace(name="m", version=version, tags={**base, "liverseg.spec_sha256": f"s{version}", **tags})


def test_served_by_gate_accepts_only_the_recorded_version_with_its_digests():
    head = history_head(_chain(3), P)
    assert served_by_gate(_version("3"), head) is None
    assert "made v3 champion, not v2 (moved outside `liverseg promote`)" in served_by_gate(_version("2"), head)
    assert "carries no gate decision" in served_by_gate(_version("3", **{"gate.rule": ""}), head)
    swapped = served_by_gate(_version("3", **{"liverseg.weights_sha256": "other"}), head)
    assert "liverseg.weights_sha256 differs from the digest history record 000003 recorded" in swapped
    assert "no history record made it champion" in served_by_gate(_version("1"), None)
