"""Governance on the local team stack (deploy/local/up.sh: PostgreSQL, S3, MLflow with basic-auth and
liverseg's guard as its authorization function): the paired gate, history the server keeps append-only
and hash-chained, one promotion at a time across hosts, approval requests, roles the server holds.

One scenario runs once (module fixture `day`) in the order a team would live it; each test checks one
fact of it. The admin's removal of a record comes last: it breaks the chain on purpose."""

from __future__ import annotations

import json
import subprocess

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from support.cli import LIVERSEG, run_liverseg
from support.models import constant_state, log_model_run
from support.stack import add_team

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
GATE = ["--min-dice", "0"]  # the machinery, not model quality: the phantom store's test split is one volume
REFRESH = [*GATE, "--rule", "non-inferior", "--margin", "0.5"]  # a retrained refresh may be up to 0.5 worse


def _as(stack, user: str, args: list[str], **kw) -> subprocess.CompletedProcess:
    return run_liverseg(args, stack.env_for(user, LIVERSEG_LOCK_DIR=str(stack.dir / f"locks-{user}")), **kw)


def _client(stack, user: str, monkeypatch) -> MlflowClient:
    for k, v in stack.env_for(user).items():
        monkeypatch.setenv(k, v)
    return MlflowClient(stack.env["MLFLOW_TRACKING_URI"])


def _accounts(stack) -> None:
    add_team(stack)  # alice, bob: scientists; rita: release
    for user, role in (("ron", "release"), ("rd", "reader"), ("mon", "monitor")):
        res = _as(
            stack, "admin", ["users", "add", user, "--role", role, "--password-stdin"], stdin=f"{user}-password-123"
        )
        assert res.returncode == 0, res.stderr
        stack.passwords[user] = f"{user}-password-123"


def _promotions(stack, store: str, out: dict, mp) -> None:
    """first champion (floor), a clearly better one, the champion's own run again (identical)."""
    alice = _client(stack, "alice", mp)
    runs = [log_model_run(constant_state(liver=b), experiment="alice-gov", store_path=store)[0] for b in (False, True)]
    promote = ["promote", "--store", store, *GATE]
    for key, run in (("first", runs[0]), ("better", runs[1])):
        assert _as(stack, "alice", ["register", "--run", run]).returncode == 0
        out[key] = _as(stack, "rita", [*promote, "--reason", key])
    mv = alice.get_model_version("liver-unet-candidates", "2")
    logged = mv.source.removeprefix("models:/")  # the logged model the version's source names
    again = alice.create_model_version(
        "liver-unet-candidates", mv.source, run_id=mv.run_id, tags=mv.tags, model_id=logged
    )
    alice.set_registered_model_alias("liver-unet-candidates", "challenger", again.version)
    out["same"] = _as(stack, "rita", [*promote, "--reason", "the same weights again"])
    out["runs"] = runs


def _race(stack, store: str, out: dict) -> None:
    """rita and ron promote the same challenger at once, each from their own lock folder (two hosts)."""
    procs = {
        user: subprocess.Popen(
            [*LIVERSEG, "promote", "--store", store, *REFRESH, "--reason", f"race {user}"],
            env=stack.env_for(user, LIVERSEG_LOCK_DIR=str(stack.dir / f"locks-{user}")),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for user in ("rita", "ron")
    }
    out["race"] = {user: (p.wait(timeout=900), *p.communicate()) for user, p in procs.items()}


def _approvals(stack, store: str, out: dict, mp) -> None:
    assert _as(stack, "alice", ["register", "--run", out["runs"][0]]).returncode == 0  # the first model: worse
    ask = ["promote", "--store", store, *REFRESH, "--request"]
    out["asked"] = _as(stack, "alice", [*ask, "--reason", "alice: smaller model, same quality"])
    out["asked_rita"] = _as(stack, "rita", [*ask, "--reason", "rita wants it too"])
    out["pending"] = _as(stack, "bob", ["requests"])
    out["self_cli"] = _as(stack, "rita", ["promote", "--store", store, *REFRESH, "--approve", "2"])
    out["self_server"] = _forge_approval(stack, mp, request="2")
    out["scientist_approves"] = _as(stack, "alice", ["promote", "--store", store, *REFRESH, "--approve", "1"])
    out["declined"] = _as(stack, "ron", ["promote", "--decline", "2", "--reason", "a duplicate of request 1"])
    out["approved"] = _as(stack, "rita", ["promote", "--store", store, *REFRESH, "--approve", "1"])


def _forge_approval(stack, mp, request: str) -> str:
    """rita writes, with MLflow's API, a well-chained record approving her own request: the server refuses."""
    from liverseg.tracking.chain import Record, encode, entry_key, history_head, read_chain

    rita = _client(stack, "rita", mp)
    tags = rita.get_registered_model("liver-unet").tags
    chain, head = read_chain(tags, "liverseg.history."), history_head(tags, "liverseg.history.")
    rec = Record(
        "promote", "liver-unet", head.to_version, head.to_version, "rita", "2026-12-02T00:00:00Z", request=request
    )
    values = {**rec.values(), "seq": chain.next_seq(), "prev": chain.head_digest()}
    with pytest.raises(MlflowException) as e:
        rita.set_registered_model_tag("liver-unet", entry_key("liverseg.history.", values["seq"]), encode(values))
    return str(e.value)


def _tamper(stack, out: dict, mp) -> None:
    """A release user with MLflow's API: overwrite and delete a record, move and delete the champion alias."""
    rita = _client(stack, "rita", mp)
    key = "liverseg.history.000001"
    forged = json.dumps({**json.loads(rita.get_registered_model("liver-unet").tags[key]), "reason": "edited"})
    other = str(int(rita.get_model_version_by_alias("liver-unet", "champion").version) - 1)
    for name, change in (
        ("overwrite", lambda: rita.set_registered_model_tag("liver-unet", key, forged)),
        ("delete", lambda: rita.delete_registered_model_tag("liver-unet", key)),
        ("move", lambda: rita.set_registered_model_alias("liver-unet", "champion", other)),
        ("unset", lambda: rita.delete_registered_model_alias("liver-unet", "champion")),
    ):
        try:
            change()
            out[name] = "accepted"
        except MlflowException as e:
            out[name] = str(e)


def _roles(stack, out: dict, mp) -> None:
    uri = stack.env["MLFLOW_TRACKING_URI"]
    rd = ("rd", stack.passwords["rd"])
    writes = {
        "experiment": ("POST", "/api/2.0/mlflow/experiments/create", {"json": {"name": "rd-exp"}}),
        "run": ("POST", "/api/2.0/mlflow/runs/create", {"json": {"experiment_id": "0"}}),
        "model": ("POST", "/api/2.0/mlflow/registered-models/create", {"json": {"name": "rd-model"}}),
        "artifact": ("PUT", "/api/2.0/mlflow-artifacts/artifacts/0/rd/blob.bin", {"data": b"x" * 1_000_000}),
    }
    out["reader"] = {k: requests.request(m, uri + p, auth=rd, timeout=60, **kw) for k, (m, p, kw) in writes.items()}
    out["reader_reads"] = requests.get(uri + "/api/2.0/mlflow/experiments/search?max_results=5", auth=rd, timeout=60)
    mon = ("mon", stack.passwords["mon"])
    shadow = _client(stack, "mon", mp).get_experiment_by_name("liverseg-shadow").experiment_id
    out["monitor_experiment"] = requests.post(uri + writes["experiment"][1], json={"name": "m"}, auth=mon, timeout=60)
    out["monitor_shadow_run"] = requests.post(
        uri + writes["run"][1], json={"experiment_id": shadow}, auth=mon, timeout=60
    )


def _half_made_account(stack, out: dict) -> None:
    """`users add` stopped between creating the login and giving it its role (as a database outage would)."""
    from liverseg.registry.team import auth_client

    uri = stack.env["MLFLOW_TRACKING_URI"]
    auth_client(uri, "admin", stack.passwords["admin"]).create_user("half", "never-shown-password-1")
    out["half_add"] = _as(
        stack, "admin", ["users", "add", "half", "--role", "scientist", "--password-stdin"], stdin="half-password-12"
    )
    out["half_login"] = requests.post(
        uri + "/api/2.0/mlflow/experiments/create",
        json={"name": "half-exp"},
        auth=("half", "half-password-12"),
        timeout=60,
    )
    out["colon"] = _as(stack, "admin", ["users", "add", "a:b", "--role", "reader"])


@pytest.fixture(scope="module")
def day(team_stack, store_path):
    stack, out = team_stack, {}
    with pytest.MonkeyPatch.context() as mp:
        _accounts(stack)
        _promotions(stack, store_path, out, mp)
        _race(stack, store_path, out)
        _approvals(stack, store_path, out, mp)
        _tamper(stack, out, mp)
        _roles(stack, out, mp)
        _half_made_account(stack, out)
        out["history"] = _as(stack, "bob", ["history"])
        out["verified"] = _as(stack, "bob", ["history", "--verify"])
        admin = _client(stack, "admin", mp)
        admin.delete_registered_model_tag("liver-unet", "liverseg.history.000002")
        out["broken"] = _as(stack, "bob", ["history", "--verify"])
    return out


def test_a_clearly_better_challenger_is_promoted(day):
    assert day["first"].returncode == 0 and "PROMOTED" in day["first"].stdout, day["first"].stderr[-2000:]
    out = day["better"].stdout
    assert day["better"].returncode == 0 and out.startswith("PROMOTED: liver-unet"), day["better"].stderr[-2000:]
    assert "rule superior: mean paired Dice difference +" in out and "lower bound above +0.0000" in out


def test_identical_models_are_refused_with_the_interval(day):
    out = day["same"].stdout.strip().splitlines()[-1]
    assert day["same"].returncode == 0 and out.startswith("KEPT: liver-unet"), day["same"].stderr[-2000:]
    assert "rule superior: mean paired Dice difference +0.0000, 95% CI [+0.0000, +0.0000] over 1 cases" in out


def test_two_concurrent_promotions_make_one_change_and_a_clear_refusal(day):
    race = day["race"]
    promoted = [u for u, (rc, out, _) in race.items() if rc == 0 and out.startswith("PROMOTED")]
    assert len(promoted) == 1, race
    (loser,) = set(race) - set(promoted)
    rc, out, err = race[loser]
    last = (err.strip().splitlines() or [""])[-1]
    refused = (
        rc == 1 and last.startswith("error: refused: ") and ("recorded first" in last or "changed meanwhile" in last)
    )
    assert refused or (rc == 0 and "challenger is already champion" in out), race[loser]
    lines = day["verified"].stdout.splitlines()
    assert sum(f"reason: race {u}" in line for line in day["history"].stdout.splitlines() for u in race) == 1
    assert lines[-1].startswith("OK: liver-unet: 5 chained records"), day["verified"].stdout


def test_requests_are_filed_listed_approved_and_declined(day):
    assert day["asked"].returncode == 0 and day["asked"].stdout.startswith("REQUESTED: #1 liver-unet"), day[
        "asked"
    ].stderr
    assert (
        "#1 candidate v1 by alice (pending)" in day["pending"].stdout
        and "#2 candidate v1 by rita" in day["pending"].stdout
    )
    assert day["declined"].stdout.startswith("DECLINED: request 2 (candidate v1 by rita)"), day["declined"].stderr
    assert day["approved"].returncode == 0 and day["approved"].stdout.startswith("PROMOTED"), day["approved"].stderr[
        -2000:
    ]
    history = day["history"].stdout.splitlines()
    assert "by rita approving request 1 of alice;" in history[0]
    assert "decline  liver-unet: request 2 (candidate v1 by rita) declined by ron" in day["history"].stdout
    assert "#1 candidate v1 by alice (approved by rita)" in day["history"].stdout


def test_nobody_approves_their_own_request(day):
    last = day["self_cli"].stderr.strip().splitlines()[-1]
    assert day["self_cli"].returncode == 1 and last.startswith(
        "error: refused: rita may not approve request 2: they made it"
    )
    assert (
        "PERMISSION_DENIED" in day["self_server"]
        and "rita may not approve request 2: they made it themselves" in day["self_server"]
    )
    last = day["scientist_approves"].stderr.strip().splitlines()[-1]
    assert last.startswith("error: refused: alice may not approve requests for liver-unet: needs EDIT")


def test_release_users_cannot_rewrite_or_delete_a_record(day):
    for change in ("overwrite", "delete"):  # PERMISSION_DENIED: MLflow's name for the server's 403
        assert "PERMISSION_DENIED" in day[change] and "records are append-only" in day[change], day[change]


def test_champion_moves_only_with_its_record(day):
    assert "PERMISSION_DENIED" in day["move"] and "moves only with its history record" in day["move"]
    assert "PERMISSION_DENIED" in day["unset"] and "never deleted by users" in day["unset"]


def test_history_verify_catches_a_record_removed_by_the_admin(day):
    assert day["verified"].returncode == 0, day["verified"].stdout
    assert day["broken"].returncode == 1
    assert day["broken"].stdout.startswith("BROKEN: liverseg.history.000002: missing (liverseg.history.000003 follows")


def test_a_reader_creates_nothing(day):
    for what, res in day["reader"].items():
        assert res.status_code == 403 and "reader accounts write nothing" in res.text, (what, res.status_code, res.text)
    assert day["reader_reads"].status_code == 200


def test_a_monitor_writes_runs_in_the_shadow_experiment_only(day):
    assert day["monitor_experiment"].status_code == 403
    assert day["monitor_shadow_run"].status_code == 200, day["monitor_shadow_run"].text


def test_users_add_completes_a_half_made_account(day):
    res = day["half_add"]
    assert res.returncode == 0 and "(completed a half-made account: new password)" in res.stdout, res.stderr
    assert day["half_login"].status_code == 200  # the new password works, and the role lets a scientist create
    assert day["colon"].returncode == 1 and "user name 'a:b': contains ':'" in day["colon"].stderr
