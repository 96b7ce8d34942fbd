"""Roles -> permissions on the tracking server; refusals in one line; the real team stack enforcing them."""

import subprocess
import sys

import pytest
import requests

from helpers import constant_state, log_model_run
from liverseg.registry import register
from liverseg.team import PermissionRefused, TeamError, add_user, candidate_model, check_can_change, grants, refusal
from stack import team_stack  # noqa: F401  (fixture)


def test_roles_split_candidates_from_served():
    assert candidate_model("liver-unet") == "liver-unet-candidates"
    assert grants("scientist", "liver-unet") == [("registered_model", "liver-unet-candidates", "EDIT")]
    assert sorted(grants("release", "liver-unet")) == [
        ("registered_model", "liver-unet", "EDIT"),
        ("registered_model", "liver-unet-candidates", "EDIT"),
    ]
    # only release may change what is served; nobody gets MANAGE (deleting the served model)
    for role in ("scientist", "release"):
        served = [p for _, m, p in grants(role, "m") if m == "m"]
        assert served == (["EDIT"] if role == "release" else [])


def test_unknown_role_lists_the_valid_ones():
    with pytest.raises(TeamError, match="role 'admin': unknown; valid roles: scientist, release"):
        grants("admin", "liver-unet")


def test_refusal_is_one_line_with_who_what_and_missing_permission():
    line = refusal("alice", "promote liver-unet", "liver-unet", "READ")
    assert line == "refused: alice may not promote liver-unet: needs EDIT on registered model 'liver-unet', has READ"
    assert issubclass(PermissionRefused, TeamError)


def test_add_user_names_the_missing_admin_variables(monkeypatch):
    for k in ("LIVERSEG_ADMIN_USER", "LIVERSEG_ADMIN_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(TeamError, match="set LIVERSEG_ADMIN_USER, LIVERSEG_ADMIN_PASSWORD"):
        add_user("alice", "scientist")
    monkeypatch.setenv("LIVERSEG_ADMIN_USER", "admin")
    monkeypatch.setenv("LIVERSEG_ADMIN_PASSWORD", "x")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///m.db")
    with pytest.raises(TeamError, match="accounts need a tracking server"):
        add_user("alice", "scientist")


def test_no_check_without_a_server_login(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///m.db")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    check_can_change("liver-unet", "promote liver-unet")  # SQLite: one user, nothing to enforce


def _cli(args: list[str], env: dict, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "liverseg.cli", *args], env=env, capture_output=True, text=True, timeout=600, cwd=cwd
    )


def add_team(stack) -> None:
    """alice and bob (scientists, generated passwords printed once), rita (release, given password)."""
    for user, role in (("alice", "scientist"), ("bob", "scientist")):
        res = _cli(["users", "add", user, "--role", role], stack.env_for("admin"))
        assert res.returncode == 0, res.stderr
        stack.passwords[user] = res.stdout.split(f"password for {user} (shown once): ")[1].split()[0]
    res = _cli(["users", "add", "rita", "--role", "release", "--password", "rita-password-123"], stack.env_for("admin"))
    assert res.returncode == 0 and "password" not in res.stdout.split(";")[-1], res.stdout + res.stderr
    stack.passwords["rita"] = "rita-password-123"
    again = _cli(["users", "add", "rita", "--role", "scientist"], stack.env_for("admin"))
    assert again.returncode == 1 and "user rita: already exists" in again.stderr


@pytest.mark.slow
def test_server_enforces_roles_and_records_history(team_stack, store_path, tmp_path, monkeypatch):  # noqa: F811
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    stack = team_stack
    add_team(stack)
    uri = stack.env["MLFLOW_TRACKING_URI"]
    assert requests.get(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30).status_code == 401
    for k, v in stack.env_for("alice").items():
        monkeypatch.setenv(k, v)
    alice = MlflowClient(uri)
    exp = alice.create_experiment("alice-search")
    rid, _ = log_model_run(constant_state(liver=True), experiment="alice-search", store_path=store_path)
    mv = register(run_id=rid)  # a scientist adds candidates
    assert (mv.name, "challenger" in mv.aliases) == ("liver-unet-candidates", True)
    with pytest.raises(MlflowException, match="403"):  # MLflow's API directly: the server refuses
        alice.copy_model_version(f"models:/liver-unet-candidates/{mv.version}", "liver-unet")
    refused = _cli(["promote", "--store", store_path, "--min-dice", "0", "--reason", "mine"], stack.env_for("alice"))
    assert refused.returncode == 1
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith(  # then the command's log file
            "error: refused: alice may not promote liver-unet: needs EDIT on registered model 'liver-unet', has READ"
        )
    )
    bob = requests.post(
        f"{uri}/api/2.0/mlflow/experiments/delete",
        json={"experiment_id": exp},
        auth=("bob", stack.passwords["bob"]),
        timeout=30,
    )
    assert bob.status_code == 403 and alice.get_experiment(exp).lifecycle_stage == "active"
    promoted = _cli(
        ["promote", "--store", store_path, "--min-dice", "0", "--reason", "first release"], stack.env_for("rita")
    )
    assert promoted.returncode == 0 and "PROMOTED" in promoted.stdout, promoted.stderr[-2000:]
    assert alice.get_model_version_by_alias("liver-unet", "champion").tags["champion_by"] == "rita"
    hist = _cli(["history"], stack.env_for("bob"))  # anyone may read it
    assert hist.returncode == 0 and "promote  liver-unet: none -> v1 (candidate v1) by rita" in hist.stdout
    assert "reason: first release" in hist.stdout
