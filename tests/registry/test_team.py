"""Roles -> permissions on the tracking server; refusals in one line; the real team stack enforcing them."""

import re
from pathlib import Path

import pytest
import requests

from liverseg.core.errors import PermissionRefused, TeamError
from liverseg.registry.register import register
from liverseg.registry.team import (
    LEVEL,
    add_user,
    check_can_change,
    check_username,
    grants,
    parse_role_name,
    password_from_stdin,
    refusal,
    role_name,
)
from liverseg.tracking.tags import candidate_model
from support.cli import run_liverseg
from support.models import constant_state, log_model_run
from support.paths import REPO
from support.stack import add_team


def test_roles_split_candidates_from_served():
    assert candidate_model("liver-unet") == "liver-unet-candidates"
    assert grants("scientist", "liver-unet") == [("registered_model", "liver-unet-candidates", "EDIT")]
    assert sorted(grants("release", "liver-unet")) == [
        ("experiment", "liverseg-served", "EDIT"),  # the served copies' files: only release writes them
        ("registered_model", "liver-unet", "EDIT"),
        ("registered_model", "liver-unet-candidates", "EDIT"),
    ]
    assert grants("reader", "liver-unet") == []  # serving: the server's default READ, nothing more
    assert grants("monitor", "liver-unet") == [("experiment", "liverseg-shadow", "EDIT")]
    # only release may change what is served; nobody gets MANAGE (deleting the served model)
    for role in ("reader", "monitor", "scientist", "release"):
        served = [p for _, m, p in grants(role, "m") if m == "m"]
        assert served == (["EDIT"] if role == "release" else [])


def test_role_names_round_trip_and_order_the_roles():
    assert role_name("release", "liver-unet") == "liverseg-release@liver-unet"
    assert parse_role_name("liverseg-release@liver-unet") == ("release", "liver-unet")
    assert parse_role_name("liverseg-owner@liver-unet") is None and parse_role_name("admins") is None
    assert LEVEL["reader"] < LEVEL["monitor"] < LEVEL["scientist"] < LEVEL["release"]


def test_user_names_basic_auth_cannot_carry_are_refused():
    for bad, why in (("a:b", "contains ':'"), ("bob\n", "contains '\\n'"), ("", "is empty"), (" al", "blank-padded")):
        with pytest.raises(TeamError, match=f"user name {re.escape(repr(bad))}: .*{re.escape(why)}"):
            check_username(bad)
    check_username("serve-svc@prod.example")


def test_unknown_role_lists_the_valid_ones():
    with pytest.raises(TeamError, match="role 'admin': unknown; valid roles: reader, monitor, scientist, release"):
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


def test_password_stdin_takes_one_line_without_its_newline():
    assert password_from_stdin("s3cret pass-word\n") == "s3cret pass-word"
    assert password_from_stdin("crlf-password\r\n") == "crlf-password"
    with pytest.raises(TeamError, match="--password-stdin: stdin is empty"):
        password_from_stdin("\n")
    with pytest.raises(TeamError, match="more than one line"):
        password_from_stdin("one\ntwo\n")


def test_users_add_refuses_two_passwords_and_warns_about_the_argument(monkeypatch):
    from typer.testing import CliRunner

    from liverseg.cli import app

    monkeypatch.delenv("LIVERSEG_ADMIN_PASSWORD", raising=False)  # refused before any login is needed
    both = CliRunner().invoke(app, ["users", "add", "x", "--role", "reader", "--password", "p", "--password-stdin"])
    # CliRunner skips the app's one-line printer: the refusal is the raised TeamError
    assert isinstance(both.exception, TeamError) and "--password and --password-stdin: give one of them" in str(
        both.exception
    )
    empty = CliRunner().invoke(app, ["users", "add", "x", "--role", "reader", "--password-stdin"], input="")
    assert isinstance(empty.exception, TeamError) and "stdin is empty" in str(empty.exception)
    helptext = " ".join(CliRunner().invoke(app, ["users", "add", "--help"], terminal_width=300).output.split())
    assert "visible to every local user in the process list" in helptext and "--password-stdin" in helptext


def test_docs_never_put_a_password_in_the_arguments():
    repo = REPO
    for doc in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            assert not re.search(r"users add .*--password[ =]", line), f"{doc.name}: {line.strip()}"


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
    refused = run_liverseg(
        ["promote", "--store", store_path, "--min-dice", "0", "--reason", "mine"], stack.env_for("alice")
    )
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
    promoted = run_liverseg(
        ["promote", "--store", store_path, "--min-dice", "0", "--reason", "first release"], stack.env_for("rita")
    )
    assert promoted.returncode == 0 and "PROMOTED" in promoted.stdout, promoted.stderr[-2000:]
    assert alice.get_model_version_by_alias("liver-unet", "champion").tags["champion_by"] == "rita"
    hist = run_liverseg(["history"], stack.env_for("bob"))  # anyone may read it
    assert hist.returncode == 0 and "promote  liver-unet: none -> v1 (candidate v1) by rita" in hist.stdout
    assert "reason: first release" in hist.stdout


@pytest.mark.slow
def test_reader_reads_the_champion_and_changes_nothing(team_stack, store_path, monkeypatch):  # noqa: F811
    """A serving account (`--role reader`, password piped on stdin) loads @champion; registering a
    candidate or moving an alias is refused by the server itself (403)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    stack, password = team_stack, "serve-svc-password-42"
    res = run_liverseg(
        ["users", "add", "serve-svc", "--role", "reader", "--password-stdin"], stack.env_for("admin"), stdin=password
    )
    assert res.returncode == 0 and res.stdout.startswith("user serve-svc (reader): READ on everything else"), res.stderr
    assert "shown once" not in res.stdout
    stack.passwords["serve-svc"] = password
    for k, v in stack.env_for("admin").items():
        monkeypatch.setenv(k, v)
    rid, model_uri = log_model_run(constant_state(liver=True), experiment="reader-check", store_path=store_path)
    admin = MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    version = mlflow.register_model(model_uri, "liver-unet").version
    admin.set_registered_model_alias("liver-unet", "champion", version)
    for k, v in stack.env_for("serve-svc").items():
        monkeypatch.setenv(k, v)
    reader = MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    assert reader.get_model_version_by_alias("liver-unet", "champion").version == version
    assert (Path(mlflow.artifacts.download_artifacts("models:/liver-unet@champion")) / "MLmodel").is_file()
    changes = (
        lambda: reader.create_model_version(candidate_model("liver-unet"), model_uri, run_id=rid),
        lambda: reader.set_registered_model_alias("liver-unet", "champion", version),
        lambda: reader.set_registered_model_alias(candidate_model("liver-unet"), "challenger", "1"),
    )
    for change in changes:
        with pytest.raises(MlflowException, match="403|PERMISSION_DENIED"):
            change()
    assert admin.get_model_version_by_alias("liver-unet", "champion").version == version
