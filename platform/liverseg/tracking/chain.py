"""Append-only records as a hash chain in registered-model tags: the champion history
(`liverseg.history.<seq>` on the served model) and approval requests (`liverseg.request.<seq>` on
`<name>-candidates`).

Each record is one tag: its key carries a six-digit sequence number, its value is canonical JSON (sorted
keys, no spaces, UTF-8 as is, so a character counts once against PostgreSQL's 5,000-character tag
column) whose `prev` field is the sha256 of the previous record's value exactly as stored. Removing,
reordering or altering a record breaks the chain at the first record after it (`problems`). Records
written before the chain (keys with a timestamp, no `prev`) are kept as `legacy`; the first chained
record's `prev` is the digest of all of them, so they are covered too.

Pure functions over a tag dict: the CLI (`liverseg history --verify`), the promotion, the tracking
server's guard (`registry.guard`) and serving replicas (`gate_marks`) read a chain the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SEQ_DIGITS = 6
ACTIONS = ("promote", "rollback", "decline")  # what a history record may say


def entry_key(prefix: str, seq: int) -> str:
    return f"{prefix}{seq:0{SEQ_DIGITS}d}"


def seq_of(prefix: str, key: str) -> int | None:
    """The sequence number of a chained record's key; None for other keys (legacy timestamps, other tags)."""
    rest = key[len(prefix) :] if key.startswith(prefix) else ""
    return int(rest) if len(rest) == SEQ_DIGITS and rest.isdigit() and int(rest) > 0 else None


def encode(values: dict[str, Any]) -> str:
    """The canonical text of a record: what is stored and hashed."""
    return json.dumps(values, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


@dataclass
class Entry:
    """One readable chained record: its sequence number, key, stored text and parsed fields."""

    seq: int
    key: str
    raw: str
    values: dict[str, Any]


@dataclass
class Chain:
    """The records under one prefix of one registered model's tags."""

    prefix: str
    entries: list[Entry] = field(default_factory=list)  # readable chained records, ascending seq
    legacy: list[tuple[str, str]] = field(default_factory=list)  # (key, value) written before the chain
    bad: list[str] = field(default_factory=list)  # one line per unreadable record, naming its key

    @property
    def head(self) -> Entry | None:
        return self.entries[-1] if self.entries else None

    @property
    def anchor(self) -> str:
        """What record 1's `prev` must be: "" without legacy records, else the digest of them all."""
        return digest(encode(dict(self.legacy))) if self.legacy else ""

    def head_digest(self) -> str:
        """What the next record's `prev` must be."""
        return digest(self.head.raw) if self.head else self.anchor

    def next_seq(self) -> int:
        return self.head.seq + 1 if self.head else 1

    def problems(self) -> list[str]:
        """Every break, first one first: unreadable records, a missing number, a `prev` that is not the
        digest of the record before (a record removed, replaced or altered after it was written)."""
        found = list(self.bad)
        before, expected = 0, self.anchor
        for e in self.entries:
            if e.seq != before + 1:
                missing = entry_key(self.prefix, before + 1)
                found.append(
                    f"{missing}: missing ({e.key} follows {entry_key(self.prefix, before) if before else 'none'})"
                )
            elif e.values.get("prev") != expected:
                what = f"record {entry_key(self.prefix, before)}" if before else "the start of the chain"
                found.append(f"{e.key}: its prev hash does not match {what} (altered, replaced or removed)")
            before, expected = e.seq, digest(e.raw)
        return found


def read_chain(tags: dict[str, str], prefix: str) -> Chain:
    """The chain under `prefix` in a registered model's tags. A record that is not a JSON object is
    listed in `bad` (one line) and skipped; the others still read."""
    chain = Chain(prefix)
    for key in sorted(k for k in tags if k.startswith(prefix)):
        value, seq = tags[key], seq_of(prefix, key)
        try:
            values = json.loads(value)
        except (TypeError, ValueError) as e:
            chain.bad.append(f"{key}: not JSON ({str(e).splitlines()[0][:80]})")
            continue
        if not isinstance(values, dict):
            chain.bad.append(f"{key}: not a JSON object")
        elif seq is None:
            chain.legacy.append((key, value))
        else:
            chain.entries.append(Entry(seq, key, value, values))
    chain.entries.sort(key=lambda e: e.seq)
    return chain


@dataclass
class Record:
    """One change of `champion` on registered model `model` (or a declined request, which changes
    nothing): who, when, from which served version to which, the gate's numbers, the files' digests."""

    action: str  # promote | rollback | decline
    model: str
    from_version: str | None  # served version before (None: there was no champion)
    to_version: str | None  # served version after (a decline: the same as before)
    by: str
    at: str  # UTC, ISO 8601 with microseconds
    reason: str = ""
    test_dice: float | None = None  # the new champion's gate score
    champion_test_dice: float | None = None  # the old champion's, same gate
    candidate: str = ""  # the candidate version promoted (<model>-candidates), if any
    gate: dict[str, str] = field(default_factory=dict)  # the paired gate's numbers (gate.* tags)
    weights_sha256: str = ""  # of the files now served
    spec_sha256: str = ""
    request: str = ""  # the approval request approved or declined, if any
    requested_by: str = ""
    prev: str = ""  # sha256 of the previous record as stored
    seq: int = 0  # 0: a legacy record (before the chain)

    def values(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_values(cls, values: dict[str, Any], seq: int = 0) -> Record:
        """A record from its JSON fields; ValueError naming the first missing or mistyped one."""
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in values.items() if k in known}
        for name in ("action", "model", "by", "at"):
            if not isinstance(kept.get(name), str) or not kept[name]:
                raise ValueError(f"field {name!r} missing or not text")
        if kept["action"] not in ACTIONS:
            raise ValueError(f"action {kept['action']!r} is none of {', '.join(ACTIONS)}")
        for name in ("test_dice", "champion_test_dice"):
            if kept.get(name) is not None and not isinstance(kept[name], (int, float)):
                raise ValueError(f"field {name!r} is not a number")
        if not isinstance(kept.get("gate", {}), dict):
            raise ValueError("field 'gate' is not an object")
        return cls(**{**kept, "seq": seq or int(kept.get("seq") or 0)})


def history_records(chain: Chain) -> tuple[list[Record], list[str]]:
    """The chained and legacy records of a history chain, oldest first, and one line per record that is
    JSON but not a record (skipped)."""
    out, bad = [], []
    raw = [(key, json.loads(value), 0) for key, value in chain.legacy]
    for key, values, seq in raw + [(e.key, e.values, e.seq) for e in chain.entries]:
        try:
            out.append(Record.from_values(values, seq))
        except (TypeError, ValueError) as e:
            bad.append(f"{key}: not a history record ({e})")
    legacy = sorted((r for r in out if not r.seq), key=lambda r: r.at)
    return legacy + [r for r in out if r.seq], bad


def history_head(tags: dict[str, str], prefix: str) -> Record | None:
    """The last history record: the last chained one, else (a history written before the chain) the
    newest legacy one; None without any, or when that record is not readable."""
    chain = read_chain(tags, prefix)
    if chain.head is None:
        legacy, _ = history_records(Chain(prefix, legacy=chain.legacy))
        return legacy[-1] if legacy else None
    try:
        return Record.from_values(chain.head.values, chain.head.seq)
    except (TypeError, ValueError):
        return None
