"""Champion history on a real SQLite store: promote, promote, rollback; who, when, from, to, the gate's numbers,
reason; one hash-chained record per change whatever fails when; user text never reaches a terminal raw."""

import json

import pytest
from mlflow.tracking import MlflowClient

from liverseg.core.errors import RegistryError
from liverseg.registry.champion import alias_version
from liverseg.registry.history import TAG_PREFIX, history, line, verify
from liverseg.registry.promote import promote, rollback
from liverseg.registry.register import register
from liverseg.tracking.chain import Record
from liverseg.tracking.runs import tracking_uri
from support.models import constant_state, log_model_run

# the gate's per-case Dice per candidate version (the evaluation itself is tested elsewhere)
CASES = {"1": [0.50, 0.52, 0.48, 0.51], "2": [0.80, 0.83, 0.79, 0.82], "3": [0.81, 0.82, 0.80, 0.83]}


def scorer(lm) -> dict[str, float]:
    client = MlflowClient(tracking_uri())
    name, version = lm.uri.removeprefix("models:/").split("/")
    mv = client.get_model_version(name, version)
    return dict(enumerate(CASES[mv.tags.get("candidate_version", version)]))


def _candidates(n: int) -> list[str]:
    return [log_model_run(constant_state(liver=i % 2 == 1))[0] for i in range(n)]


def test_history_newest_first_with_who_scores_gate_and_reason(mlflow_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "rita")  # the login is the author, as on the server
    runs = _candidates(2)
    register(run_id=runs[0])
    assert promote("unused", min_dice=0.1, scorer=scorer, reason="first model").champion_after == "1"
    register(run_id=runs[1])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ron")
    d = promote("unused", min_dice=0.1, scorer=scorer, reason="better on the new cases")
    assert d.promoted and (d.champion_before, d.champion_after) == ("1", "2") and d.gate.n_cases == 4
    assert rollback(reason="complaints from radiology") == ("2", "1")

    client = MlflowClient(tracking_uri())
    changes, bad = history(client, "liver-unet")
    assert bad == [] and [(c.action, c.from_version, c.to_version, c.by, c.seq) for c in changes] == [
        ("rollback", "2", "1", "ron", 3),
        ("promote", "1", "2", "ron", 2),
        ("promote", None, "1", "rita", 1),
    ]
    assert changes[0].at > changes[1].at > changes[2].at
    assert (changes[1].test_dice, changes[1].champion_test_dice, changes[1].candidate) == pytest.approx(
        (0.81, 0.5025, "2")
    )
    assert changes[1].gate["gate.rule"] == "superior" and float(changes[1].gate["gate.diff_ci_low"]) > 0
    assert changes[0].reason == "complaints from radiology" and changes[2].reason == "first model"
    assert "gate superior: diff +0.3075 CI [" in line(changes[1]) and "n=4; reason: better on the new cases" in line(
        changes[1]
    )
    # visible in the UI: one tag per change on the served model, and the version made champion
    tags = client.get_registered_model("liver-unet").tags
    assert sorted(json.loads(v)["action"] for k, v in tags.items() if k.startswith(TAG_PREFIX)) == [
        "promote",
        "promote",
        "rollback",
    ]
    v1 = client.get_model_version("liver-unet", "1").tags
    assert (v1["champion_by"], v1["champion_from"], v1["champion_reason"]) == ("ron", "2", "complaints from radiology")
    assert v1["liverseg.history_seq"] == "3"
    problems, summary = verify(client, "liver-unet", alias_version(client, "liver-unet", "champion"))
    assert problems == [] and summary.startswith("liver-unet: 3 chained records (0 before the chain), champion v1")
    client.delete_registered_model_tag("liver-unet", "liverseg.history.000002")  # what only an admin can do on a server
    problems, _ = verify(client, "liver-unet", alias_version(client, "liver-unet", "champion"))
    assert problems[0].startswith(
        "liverseg.history.000002: missing (liverseg.history.000003 follows liverseg.history.000001)"
    )


def test_a_model_re_registered_from_the_champions_run_is_not_better(mlflow_uri, store_path):
    """Same run, new candidate version: same bytes, every per-case difference 0, CI [0, 0]: kept."""
    run = _candidates(2)[1]
    register(run_id=run)
    assert promote(store_path, min_dice=0.0).promoted
    client = MlflowClient(tracking_uri())
    mv = register(run_id=run)  # the same run again returns its version: register it under a new version by hand
    again = client.create_model_version(
        "liver-unet-candidates", mv.source, run_id=run, tags=mv.tags, model_id=mv.source.removeprefix("models:/")
    )
    client.set_registered_model_alias("liver-unet-candidates", "challenger", again.version)
    d = promote(store_path, min_dice=0.0)
    assert not d.promoted and "CI [+0.0000, +0.0000]" in d.reason and d.champion_after == "1"
    assert client.get_model_version("liver-unet-candidates", again.version).tags["gate.diff_mean"] == "0.000000"


def test_reasons_are_escaped_and_bounded_before_anything_is_written(mlflow_uri, monkeypatch):
    runs = _candidates(2)
    register(run_id=runs[0])
    with pytest.raises(RegistryError, match="--reason: 1001 characters, at most 1000"):
        promote("unused", min_dice=0.1, scorer=scorer, reason="x" * 1001)
    client = MlflowClient(tracking_uri())
    assert "promotion_decision" not in client.get_model_version("liver-unet-candidates", "1").tags  # nothing written
    forged = "ok\n2026-01-01T00:00:00Z  promote  liver-unet: v9 -> v10 by ceo\x1b[2J\u202e" + "é" * 900
    d = promote("unused", min_dice=0.1, scorer=scorer, reason=forged[:1000])
    assert d.promoted  # 900 accented characters are 900 characters of the record, not 5,400 escaped ones
    (rec,), _ = history(client, "liver-unet")
    shown = line(rec)
    assert "\n" not in shown and "\x1b" not in shown and "\u202e" not in shown
    assert "ok\\n2026-01-01" in shown and "\\x1b[2J" in shown and "\\u202e" in shown
    card = client.get_model_version("liver-unet", "1").description
    assert "\x1b" not in card and len(card) <= 5000


def test_a_change_recorded_but_not_moved_is_completed_by_the_next_run(mlflow_uri, monkeypatch):
    """The database fails between the record and the alias move: exit with an error, one record, champion
    unchanged; `history --verify` names the half-done change; the next promote completes it, once."""
    runs = _candidates(2)
    register(run_id=runs[0])
    promote("unused", min_dice=0.1, scorer=scorer)
    register(run_id=runs[1])
    real = MlflowClient.set_registered_model_alias

    def fail_champion(self, name, alias, version):
        if alias == "champion":
            raise ConnectionError("database went away")
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", fail_champion)
    with pytest.raises(ConnectionError):
        promote("unused", min_dice=0.1, scorer=scorer, reason="v2 please")
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real)
    client = MlflowClient(tracking_uri())
    assert str(alias_version(client, "liver-unet", "champion").version) == "1"
    problems, _ = verify(client, "liver-unet", alias_version(client, "liver-unet", "champion"))
    assert problems == [
        "liverseg.history.000002: records promote v1 -> v2, but champion is still v1 (half done: run "
        "`liverseg promote` again to complete it)"
    ]
    d = promote("unused", min_dice=0.1, scorer=scorer, reason="v2 please")
    assert d.note == "completed the promote recorded as liverseg.history.000002: champion v1 -> v2"
    assert not d.promoted and d.reason == "challenger is already champion"
    changes, _ = history(client, "liver-unet")
    assert [c.seq for c in changes] == [2, 1] and changes[0].reason == "v2 please"
    assert verify(client, "liver-unet", alias_version(client, "liver-unet", "champion"))[0] == []


def test_a_bypassed_champion_is_refused_and_shown_on_the_card(mlflow_uri):
    runs = _candidates(3)
    for run in runs[:2]:
        register(run_id=run)
        promote("unused", min_dice=0.1, scorer=scorer)
    client = MlflowClient(tracking_uri())
    client.set_registered_model_alias("liver-unet", "champion", "1")  # MLflow's UI or API, around the gate
    problems, _ = verify(client, "liver-unet", alias_version(client, "liver-unet", "champion"))
    assert problems == [
        "champion liver-unet v1: the last history record (000002, promote by "
        f"{changes_by(client)}) made v2 champion, not v1 (moved outside `liverseg promote`)"
    ]
    register(run_id=runs[2])
    with pytest.raises(RegistryError, match="champion is v1, but the last history record .* made v2 champion"):
        promote("unused", min_dice=0.1, scorer=scorer)
    assert (
        "**Warning**: liver-unet v1: the last history record" in client.get_registered_model("liver-unet").description
    )


def changes_by(client) -> str:
    return history(client, "liver-unet")[0][0].by


def test_records_list_even_when_one_is_broken(mlflow_uri):
    register(run_id=_candidates(1)[0])
    promote("unused", min_dice=0.1, scorer=scorer)
    client = MlflowClient(tracking_uri())
    client.set_registered_model_tag("liver-unet", "liverseg.history.000002", "{broken")
    changes, bad = history(client, "liver-unet")
    assert len(changes) == 1 and bad == [
        "liverseg.history.000002: not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"
    ]


def test_record_line_names_everything():
    c = Record("promote", "liver-unet", "3", "4", "rita", "2026-11-28T09:00:00.000000Z", "why", 0.91, 0.9, "7")
    assert line(c) == (
        "2026-11-28T09:00:00.000000Z  promote  liver-unet: v3 -> v4 (candidate v7) by rita; "
        "test Dice 0.9100 vs 0.9000; reason: why"
    )
    first = Record("promote", "liver-unet", None, "1", "al", "t", "", 0.5)
    assert "none -> v1" in line(first) and "vs -" in line(first) and "reason: -" in line(first)
