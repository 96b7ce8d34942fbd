"""deploy/local/stack.py: the team stack really starts (as root, inside a 0700 folder), answers, keeps its
data across a kill -9 and a down/up, and stops without leaving a process. The scenario runs once, in a
module-scoped fixture; each test names one fact it established. Refusals come first, without servers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from support.paths import REPO
from support.stack import STACK, Stack, new_stack_dir


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STACK), *args], capture_output=True, text=True, timeout=60)


# --- refusals: one line, before anything starts --------------------------------------------------------


def test_a_folder_too_long_for_unix_sockets_is_refused_before_anything_starts(tmp_path):
    d = tmp_path / ("x" * 60)
    res = _run("up", str(d))
    assert res.returncode == 1 and res.stdout == "" and not d.exists()
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"stack: error: {d}: path longer than 48 characters")


def test_env_and_down_of_a_folder_without_a_stack_say_so_in_one_line():
    d = Path(f"/tmp/lsk-missing-{os.getpid()}")
    res = _run("env", str(d))
    assert res.returncode == 1 and res.stderr.splitlines() == [f"stack: error: {d}: no such folder"]
    d = new_stack_dir()
    try:
        d.mkdir()
        res = _run("env", str(d))
        want = f"stack: error: {d}: the stack is not running (deploy/local/stack.py up {d})"
        assert res.returncode == 1 and res.stderr.splitlines() == [want]
        assert _run("down", str(d)).returncode == 0
    finally:
        Stack(d).remove()


# --- the scenario ---------------------------------------------------------------------------------------


def _publish_and_crown(stack: Stack, store_path: str, monkeypatch) -> str:
    """A release user (made by the admin) logs a model run, promotes its version and publishes the store."""
    from liverseg.data.publish import publish_store
    from liverseg.registry.promote import promote
    from liverseg.registry.register import register
    from liverseg.registry.team import add_user
    from support.models import constant_state, log_model_run

    for k, v in stack.env_for("admin").items():
        monkeypatch.setenv(k, v)
    stack.passwords["rita"], _ = add_user("rita", "release")
    env = stack.env_for("rita")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    url = f"{env['LIVERSEG_BUCKET_URL']}/stores/slices.zarr"
    publish_store(store_path, url)
    run, _ = log_model_run(constant_state(liver=True), store_path=url)
    register(run_id=run)
    assert promote(url, min_dice=0.0, scorer=lambda lm: {"0": 0.5}).promoted  # {case: Dice}
    return url


def _champion_and_store(env: dict[str, str], url: str, store_path: str, monkeypatch) -> tuple[str, dict]:
    """The champion loads (its files match their sha256 tags) and the store reads back whole."""
    import s3fs

    from liverseg.data.store import SliceStore
    from liverseg.tracking.models import load_model

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()  # the endpoint may have moved: no cached client
    model = load_model("models:/liver-unet@champion", device="cpu")
    remote, local = SliceStore(url), SliceStore(store_path)
    case = local.cases[0]
    same = all(np.array_equal(a, b) for a, b in zip(remote.volume(case), local.volume(case)))
    return model.uri, {"problems": remote.verify(), "cases": remote.cases == local.cases, "same": same}


def _ray(env: dict[str, str]) -> tuple[int, int, int]:
    """(alive Ray nodes seen by a client with the printed lines, Jobs API status without, with the token)."""
    nodes = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    jobs = env["RAY_API_SERVER_ADDRESS"] + "/api/jobs/"
    token = {"Authorization": "Bearer " + Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()}
    return (
        int(nodes.stdout.split()[-1]),
        requests.get(jobs, timeout=10).status_code,
        requests.get(jobs, headers=token, timeout=10).status_code,
    )


@pytest.fixture(scope="module")
def scenario(store_path, tmp_path_factory):
    """up (as root in a 0700 folder) -> model, champion and store -> up again (running) -> kill -9 ->
    up -> read everything -> down -> up -> down. Records what each step showed."""
    mp = pytest.MonkeyPatch()
    stack, seen = Stack(new_stack_dir(closed=True)), {}
    try:
        seen["env"] = stack.up()
        seen["files"] = {f: (stack.dir / f).stat().st_mode & 0o777 for f in ("secrets.env", "stack.env", "admin.env")}
        seen["written"] = {f: (stack.dir / f).read_text() for f in ("stack.env", "admin.env")}
        seen["pg"] = stack.dir / "pg"
        seen["pg_target"] = (stack.dir / "pg").resolve()
        admin = stack.env_for("admin")
        uri = admin["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=5"
        seen["anonymous"] = requests.get(uri, timeout=30).status_code
        seen["admin"] = requests.get(uri, auth=("admin", stack.passwords["admin"]), timeout=30).status_code
        seen["ray"] = _ray(admin)
        url = _publish_and_crown(stack, store_path, mp)
        seen["again"] = stack.up()
        seen["killed"] = stack.kill()
        seen["after_kill"] = stack.up()
        seen["read_after_kill"] = _champion_and_store(stack.env_for("admin"), url, store_path, mp)
        running = stack.processes()
        stack.down()
        seen["left_after_down"] = [p for p in running if Path(f"/proc/{p}").exists()] + stack.processes()
        seen["after_down"] = stack.up()
        seen["read_after_down"] = _champion_and_store(stack.env_for("admin"), url, store_path, mp)
        stack.down()
        seen["left_at_end"] = stack.processes()
        yield stack, seen
    finally:
        mp.undo()
        if stack.processes():
            stack.down()
        stack.remove()


@pytest.mark.slow
def test_up_prints_what_members_need_and_keeps_admin_secrets_apart(scenario):
    stack, seen = scenario
    env = seen["env"]
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    assert {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "LIVERSEG_BUCKET_URL"} <= set(env)
    for key in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "RAY_API_SERVER_ADDRESS"):
        assert env[key].startswith("http://127.0.0.1:"), key
    assert seen["files"] == {"secrets.env": 0o600, "stack.env": 0o600, "admin.env": 0o600}
    shared, admin = (
        dict(line.split("=", 1) for line in (stack.dir / f).read_text().splitlines())
        for f in ("stack.env", "admin.env")
    )
    assert admin.keys() == {"LIVERSEG_ADMIN_USER", "LIVERSEG_ADMIN_PASSWORD", "LIVERSEG_WEBHOOK_SECRET"}
    assert {**shared, **admin} == env and env["LIVERSEG_ADMIN_PASSWORD"] not in (stack.dir / "stack.env").read_text()


@pytest.mark.slow
def test_as_root_in_a_0700_folder_postgres_files_live_where_postgres_reaches_them(scenario):
    _, seen = scenario
    if os.getuid() != 0:  # CI and the team's machines run as root; a user's PostgreSQL reads DIR/pg itself
        assert seen["pg"].is_dir() and not seen["pg"].is_symlink()
        return
    assert seen["pg"].is_symlink() and seen["pg_target"].owner() == "postgres"
    assert seen["pg_target"].is_relative_to(Path("~postgres").expanduser())


@pytest.mark.slow
def test_tracking_server_needs_a_login(scenario):
    _, seen = scenario
    assert (seen["anonymous"], seen["admin"]) == (401, 200)


@pytest.mark.slow
def test_two_ray_nodes_and_a_jobs_api_behind_the_token(scenario):
    _, seen = scenario
    assert seen["ray"] == (2, 401, 200)


@pytest.mark.slow
def test_up_while_running_prints_the_same_lines(scenario):
    _, seen = scenario
    assert seen["again"] == seen["env"]


@pytest.mark.slow
def test_champion_and_store_survive_a_kill_9_of_the_whole_stack(scenario):
    _, seen = scenario
    assert len(seen["killed"]) > 20  # every server process, Ray's too, at once
    assert seen["after_kill"]["LIVERSEG_ADMIN_PASSWORD"] == seen["env"]["LIVERSEG_ADMIN_PASSWORD"]
    version, store = seen["read_after_kill"]
    assert version == "models:/liver-unet/1" and store == {"problems": {}, "cases": True, "same": True}


@pytest.mark.slow
def test_down_leaves_no_process_and_up_reuses_the_data(scenario):
    _, seen = scenario
    assert seen["left_after_down"] == [] and seen["left_at_end"] == []
    assert seen["after_down"] == seen["env"]  # same data, secrets and (free again) ports: members' shells work on
    version, store = seen["read_after_down"]
    assert version == "models:/liver-unet/1" and store == {"problems": {}, "cases": True, "same": True}


def test_up_sh_and_down_sh_only_wrap_stack_py():
    for name, command in (("up.sh", "up"), ("down.sh", "down")):
        text = (REPO / "deploy" / "local" / name).read_text()
        assert f'exec "$py" "$here/stack.py" {command} "$@"' in text and len(text.splitlines()) < 12
