"""Champion history: every change of `champion` (promote, rollback) and every declined request, one
hash-chained record each (`tracking.chain`): who, when, from which version to which, the gate's
numbers, the digests of the files served, the reason. `liverseg history` lists them newest first with
the approval requests; `liverseg history --verify` recomputes the chain and checks the champion
against it.

Kept where the MLflow UI shows it: one tag `liverseg.history.<seq>` per record on the served registered
model, its value the record as JSON; on the version made champion the tags `champion_by`,
`champion_at`, `champion_from`, `champion_reason` and `liverseg.history_seq`. A record is written
before the alias moves, so a failure in between leaves a record whose change the next promote or
rollback completes (`promote.complete_pending`), never a move without a record. On a team server
liverseg's guard (`registry.guard`) makes the records append-only and lets one record win per number.
"""

from __future__ import annotations

from typing import Any

from liverseg.core.errors import RegistryError
from liverseg.core.limits import MLFLOW_TAG_KEY_CHARS, MLFLOW_TAG_VALUE_CHARS
from liverseg.tracking import tags
from liverseg.tracking.chain import Chain, Record, encode, entry_key, history_records, read_chain
from liverseg.tracking.gate_marks import served_by_gate
from liverseg.tracking.runs import failure

TAG_PREFIX = tags.HISTORY_PREFIX


def printable(text: str) -> str:
    """User text as one terminal-safe line: control and format characters (newlines, escape sequences,
    bidi overrides) written as Python escapes, so a reason can neither forge lines nor drive a terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _dice(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _gate_text(gate: dict[str, str]) -> str:
    shadow = (
        f"; shadow {printable(gate[tags.SHADOW_COMPARED])} requests, Dice mean {printable(gate.get(tags.SHADOW_DICE_MEAN, '-'))}"
        if gate.get(tags.SHADOW_COMPARED)
        else ""
    )
    if not gate.get(tags.GATE_RULE) or not gate.get(tags.GATE_DIFF_MEAN):
        return (f"; gate {gate[tags.GATE_RULE]}" if gate.get(tags.GATE_RULE) else "") + shadow
    return (
        f"; gate {gate[tags.GATE_RULE]}: diff {float(gate[tags.GATE_DIFF_MEAN]):+.4f} "
        f"CI [{float(gate[tags.GATE_DIFF_CI_LOW]):+.4f}, {float(gate[tags.GATE_DIFF_CI_HIGH]):+.4f}] "
        f"n={gate.get(tags.GATE_N_CASES, '-')}{shadow}"
    )


def line(r: Record) -> str:
    """One line per record, user text escaped."""
    p = printable
    if r.action == "decline":
        return (
            f"{r.at}  decline  {p(r.model)}: request {p(r.request)} (candidate v{p(r.candidate)} by "
            f"{p(r.requested_by)}) declined by {p(r.by)}; champion stays v{p(r.to_version or '-')}; reason: {p(r.reason) or '-'}"
        )
    frm = f"v{p(r.from_version)}" if r.from_version else "none"
    cand = f" (candidate v{p(r.candidate)})" if r.candidate else ""
    req = f" approving request {p(r.request)} of {p(r.requested_by)}" if r.request else ""
    return (
        f"{r.at}  {r.action:<8} {p(r.model)}: {frm} -> v{p(r.to_version)}{cand} by {p(r.by)}{req}; "
        f"test Dice {_dice(r.test_dice)} vs {_dice(r.champion_test_dice)}{_gate_text(r.gate)}; reason: {p(r.reason) or '-'}"
    )


def check_fits(key: str, value: str) -> None:
    """Refuse, before anything is written, a tag the tracking server's database would refuse."""
    if len(key) > MLFLOW_TAG_KEY_CHARS or len(value) > MLFLOW_TAG_VALUE_CHARS:
        raise RegistryError(
            f"{key}: the record is {len(value)} characters, over MLflow's {MLFLOW_TAG_VALUE_CHARS}-character tag "
            "column (PostgreSQL); shorten --reason"
        )


def check_record_fits(record: Record) -> None:
    """`check_fits` for `record` as it will be stored, before its number, previous hash or (for a new
    served copy) version number are known: the widest of each is assumed."""
    values = {**record.values(), "prev": "f" * 64, "seq": 999_999, "to_version": record.to_version or "9" * 10}
    check_fits(entry_key(TAG_PREFIX, 999_999), encode(values))


def chain_of(client: Any, model: str, prefix: str = TAG_PREFIX) -> Chain:
    """`model`'s records under `prefix`; a refused login or a server down is an error saying so (`runs.failure`)."""
    try:
        model_tags = client.get_registered_model(model).tags
    except Exception as e:
        err = failure(e, model)
        raise (
            RegistryError(f"{model}: no such registered model, no history") if isinstance(err, RegistryError) else err
        ) from None
    return read_chain(model_tags or {}, prefix)


def append(client: Any, model: str, values: dict[str, Any], prefix: str = TAG_PREFIX) -> tuple[int, str]:
    """Append `values` as the next record of `model`'s chain under `prefix` (its `seq` and `prev` are
    filled in); returns (seq, stored text). Refused in one line when another record took that number
    first (the guard on a team server; a re-read without one)."""
    from mlflow.exceptions import MlflowException

    chain = chain_of(client, model, prefix)
    if prefix == TAG_PREFIX and (head := _head_record(chain)) is not None and values["from_version"] != head.to_version:
        raise RegistryError(
            f"refused: {model} changed meanwhile: {entry_key(prefix, head.seq)} by {head.by} made v{head.to_version} "
            f"champion, this change starts from v{values['from_version']}; nothing was recorded or moved: run it again"
        )
    values = {**values, "seq": chain.next_seq(), "prev": chain.head_digest()}
    key, value = entry_key(prefix, values["seq"]), encode(values)
    check_fits(key, value)
    try:
        client.set_registered_model_tag(model, key, value)
    except MlflowException as e:
        first = chain_of(client, model, prefix).head
        if first is not None and first.seq >= values["seq"]:  # another change took the number first
            raise RegistryError(
                f"refused: another change of {model} was recorded first ({first.key} by {first.values.get('by')} "
                f"at {first.values.get('at')}); nothing of this one was recorded or moved: run it again"
            ) from None
        msg = str(e.message).strip().splitlines()[0] if str(e.message).strip() else e.error_code
        raise RegistryError(f"refused by the tracking server: {msg}") from None
    if chain_of(client, model, prefix).head.raw != value:  # no guard (SQLite, a plain server): a late overwrite
        raise RegistryError(f"{model}: record {key} was overwritten by a concurrent change; nothing was moved")
    return values["seq"], value


def _head_record(chain: Chain) -> Record | None:
    records, _ = history_records(chain)
    return records[-1] if records else None


def history(client: Any, model: str) -> tuple[list[Record], list[str]]:
    """Every record of `model`'s history, newest first, and one line per unreadable record (skipped)."""
    chain = chain_of(client, model)
    records, bad = history_records(chain)
    return list(reversed(records)), chain.bad + bad


def verify(client: Any, model: str, champion: Any | None) -> tuple[list[str], str]:
    """Problems with `model`'s history, first one first (empty: intact), and a one-line summary.
    `champion`: the version `@champion` names now (None: no alias)."""
    chain = chain_of(client, model)
    records, bad = history_records(chain)
    problems = chain.problems() + bad
    chained = [r for r in records if r.seq]
    for before, after in zip(chained, chained[1:]):
        if after.from_version != before.to_version:
            problems.append(
                f"{entry_key(TAG_PREFIX, after.seq)}: starts from v{after.from_version}, but record "
                f"{entry_key(TAG_PREFIX, before.seq)} left v{before.to_version} champion (a change is missing)"
            )
    head = records[-1] if records else None
    problems += _champion_problems(champion, head, head is not None and completed(client, head))
    last = chain.head.seq if chain.head else 0
    for mv in client.search_model_versions(f"name = '{model}'"):
        named = int((mv.tags or {}).get(tags.HISTORY_SEQ) or 0)
        if named > last:
            problems.append(
                f"{entry_key(TAG_PREFIX, named)}: missing (v{mv.version}'s {tags.HISTORY_SEQ} tag names it; the chain "
                f"ends at {last:06d}: records removed from its end)"
            )
    champ = f"champion v{champion.version}" if champion is not None else "no champion"
    summary = f"{model}: {len(chained)} chained records ({len(records) - len(chained)} before the chain), {champ}"
    return problems, summary + (f", head sha256 {chain.head_digest()}" if chain.head else "")


def completed(client: Any, head: Record) -> bool:
    """Whether the change `head` records was carried out to its end once (its version got the marks
    written after the move): a champion that is elsewhere now was moved back around the gate."""
    from mlflow.exceptions import MlflowException

    if not head.seq or not head.to_version:
        return False
    try:
        marks = client.get_model_version(head.model, head.to_version).tags or {}
    except MlflowException:
        return False
    return marks.get(tags.HISTORY_SEQ) == str(head.seq)


def _champion_problems(champion: Any | None, head: Record | None, done: bool) -> list[str]:
    version = str(champion.version) if champion is not None else None
    if head is None:
        return [] if version is None else [f"champion v{version}: no history record made it champion (a bypass)"]
    if head.to_version != version and head.from_version == version and not done:
        return [
            f"{entry_key(TAG_PREFIX, head.seq)}: records {head.action} v{head.from_version} -> v{head.to_version}, "
            f"but champion is still {'v' + version if version else 'unset'} (half done: run `liverseg "
            f"{'rollback' if head.action == 'rollback' else 'promote'}` again to complete it)"
        ]
    if version is None:
        return [f"no champion, but record {entry_key(TAG_PREFIX, head.seq)} made v{head.to_version} champion"]
    why = served_by_gate(champion, head)
    return [f"champion {why}"] if why else []
