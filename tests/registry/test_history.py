"""Champion history on a real SQLite store: promote, promote, rollback; who, when, from, to, scores, reason."""

import json

from mlflow.tracking import MlflowClient

from liverseg.registry.history import TAG_PREFIX, Change, history
from liverseg.registry.promote import promote, rollback
from liverseg.registry.register import register
from liverseg.tracking.runs import tracking_uri
from support.models import constant_state, log_model_run


def test_history_newest_first_with_who_scores_and_reason(mlflow_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "rita")  # the login is the author, as on the server
    runs = [log_model_run(constant_state(liver=b))[0] for b in (False, True)]
    dice = {"1": 0.5, "2": 0.8}  # the gate's score per candidate version (the evaluation is tested elsewhere)

    def scorer(lm) -> float:
        client = MlflowClient(tracking_uri())
        name, version = lm.uri.removeprefix("models:/").split("/")
        mv = client.get_model_version(name, version)
        return dice[mv.tags.get("candidate_version", version)]

    register(run_id=runs[0])
    assert promote("unused", min_dice=0.1, scorer=scorer, reason="first model").champion_after == "1"
    register(run_id=runs[1])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ron")
    d = promote("unused", min_dice=0.1, scorer=scorer, reason="better on the new cases")
    assert d.promoted and (d.champion_before, d.champion_after) == ("1", "2")
    assert rollback(reason="complaints from radiology") == ("2", "1")

    client = MlflowClient(tracking_uri())
    changes = history(client, "liver-unet")
    assert [(c.action, c.from_version, c.to_version, c.by) for c in changes] == [
        ("rollback", "2", "1", "ron"),
        ("promote", "1", "2", "ron"),
        ("promote", None, "1", "rita"),
    ]
    assert changes[0].at > changes[1].at > changes[2].at
    assert (changes[1].test_dice, changes[1].champion_test_dice, changes[1].candidate) == (0.8, 0.5, "2")
    assert (changes[0].test_dice, changes[0].champion_test_dice) == (0.5, 0.8)  # back to 0.5 from 0.8
    assert changes[0].reason == "complaints from radiology" and changes[2].reason == "first model"
    # visible in the UI: tags on the served model (one per change) and on the version made champion
    tags = client.get_registered_model("liver-unet").tags
    assert sorted(json.loads(v)["action"] for k, v in tags.items() if k.startswith(TAG_PREFIX)) == [
        "promote",
        "promote",
        "rollback",
    ]
    v1 = client.get_model_version("liver-unet", "1").tags
    assert (v1["champion_by"], v1["champion_from"], v1["champion_reason"]) == ("ron", "2", "complaints from radiology")
    assert client.get_model_version("liver-unet", "2").tags["champion_reason"] == "better on the new cases"


def test_change_line_names_everything():
    c = Change("promote", "liver-unet", "3", "4", "rita", "2026-11-28T09:00:00.000000Z", "why", 0.91, 0.9, "7")
    assert c.line() == (
        "2026-11-28T09:00:00.000000Z  promote  liver-unet: v3 -> v4 (candidate v7) by rita; "
        "test Dice 0.9100 vs 0.9000; reason: why"
    )
    first = Change("promote", "liver-unet", None, "1", "al", "t", "", 0.5)
    assert "none -> v1" in first.line() and "vs -" in first.line() and "reason: -" in first.line()


def test_a_record_edited_by_hand_is_left_out_in_one_line(mlflow_uri):
    """Before: a history tag that was not JSON (or had other keys, or a score of text) ended
    `liverseg history` in a traceback. After: the good records are listed, each bad one named once."""
    from support.cli import run_liverseg

    client = MlflowClient(tracking_uri())
    client.create_registered_model("liver-unet")
    good = Change("promote", "liver-unet", None, "1", "rita", "2026-11-28T09:00:00.000000Z", "first", 0.9)
    client.set_registered_model_tag("liver-unet", TAG_PREFIX + "20261128T090000.000000Z", json.dumps(good.__dict__))
    for i, bad in enumerate(
        ["not json", "[1]", '{"action": "promote"}', json.dumps({**good.__dict__, "test_dice": "x"})]
    ):
        client.set_registered_model_tag("liver-unet", f"{TAG_PREFIX}bad{i}", bad)
    skipped: list[str] = []
    assert history(client, "liver-unet", skipped) == [good] and len(skipped) == 4
    res = run_liverseg(["history"])
    assert res.returncode == 0 and res.stdout.strip() == good.line(), res.stdout + res.stderr
    warnings = res.stderr.strip().splitlines()
    assert len(warnings) == 4 and all(w.endswith("is not a champion change record; left out") for w in warnings)
