import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from support.paths import REPO


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "liverseg.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_every_stage():
    out = _cli("--help").stdout
    for cmd in (
        "synth",
        "ingest",
        "train",
        "tune",
        "evaluate",
        "score",
        "register",
        "promote",
        "rollback",
        "lineage",
        "predict",
        "serve",
        "webhook",
    ):
        assert cmd in out, cmd


def test_bad_override_is_a_one_line_error(tmp_path):
    res = _cli("train", "--store", str(tmp_path), "--set", "train.epochz=3")
    assert res.returncode == 2
    line = res.stderr.strip()
    assert line.startswith("error: --set: unknown key 'train.epochz'") and "train.epochs" in line and "\n" not in line


def test_missing_store_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    res = _cli("train", "--store", str(tmp_path / "nope.zarr"))
    assert res.returncode == 1 and "nope.zarr" in res.stderr and "Traceback" not in res.stderr


def test_import_has_no_side_effects(tmp_path):
    rooms = [f"liverseg.{m}" for m in ("cli", "training.train", "training.tune", "serving.server", "registry.promote")]
    code = f"import os, {', '.join(rooms)}; print(sorted(os.listdir('.')))"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "[]"


def test_version():
    from importlib.metadata import version

    res = _cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"liverseg {version('liverseg')}"


@pytest.mark.parametrize("stage, model", [("train", "TrainConfig"), ("tune", "TuneConfig"), ("ingest", "IngestConfig")])
def test_help_lists_every_key_with_default_and_reason(stage, model):
    from typer.testing import CliRunner

    from liverseg.cli import app
    from liverseg.core import config
    from liverseg.core.loading import PRECEDENCE, describe_keys

    out = CliRunner().invoke(app, [stage, "--help"], terminal_width=200).stdout
    assert PRECEDENCE in " ".join(out.split())
    for key, default, why in describe_keys(getattr(config, model)):
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(f"{key} = ")), None)
        assert line is not None, f"{key} missing from `{stage} --help`"
        assert json.dumps(default) in line and why in line, line


def test_misspelled_key_suggests_and_bad_value_names_set(tmp_path):
    res = _cli("train", "--store", str(tmp_path), "--set", "train.epoch=3")
    assert res.returncode == 2 and "did you mean 'train.epochs'?" in res.stderr
    res = _cli("train", "--store", str(tmp_path), "--set", "train.lr=-1")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: --set: train.lr:")


def test_plain_train_uses_the_profile_switch(tmp_path):
    """No --config/--profile: pipelines/train.yaml and the profile named in pipelines/profile.yaml."""
    shutil.copytree(REPO / "pipelines", tmp_path / "pipelines")
    (tmp_path / "pipelines" / "profile.yaml").write_text("profile: demo\n")
    res = _cli("train", "--store", str(tmp_path / "nope.zarr"), cwd=tmp_path)
    assert "train: config pipelines/train.yaml, profile demo" in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]  # the root cause, then the log file that has the details
    assert res.returncode == 1 and "nope.zarr" in last and f"(log: {os.environ['LIVERSEG_LOG_DIR']}/train-" in last
    (tmp_path / "pipelines" / "profile.yaml").write_text("profile: papr\n")
    res = _cli("train", "--store", str(tmp_path / "nope.zarr"), cwd=tmp_path)
    assert res.returncode == 2 and "unknown profile 'papr' (did you mean 'paper'?)" in res.stderr


def test_fault_injection_is_not_a_user_setting():
    from liverseg.core.config import TrainConfig
    from liverseg.core.loading import valid_keys

    assert "run.fail_at_epoch" not in valid_keys(TrainConfig)
    res = _cli("train", "--store", "x", "--set", "run.fail_at_epoch=1")
    assert res.returncode == 2 and "unknown key 'run.fail_at_epoch'" in res.stderr


def test_model_errors_are_one_line(tmp_path):
    """Every command reports liverseg's errors through one handler: `error: ...`, exit 1, no traceback."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "liverseg.json").write_text('{"format_version": 99}')
    (tmp_path / "ct.nii.gz").write_bytes(b"")  # inputs are checked before the model: one that exists
    for model, says in ((str(tmp_path / "nope"), "not a model folder"), (str(tmp_path / "m"), "format version 99")):
        res = _cli("predict", str(tmp_path / "ct.nii.gz"), str(tmp_path / "out.nii.gz"), "--model", model)
        assert res.returncode == 1 and res.stderr.startswith("error: ") and says in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_expected_failures_are_one_line_without_traceback(tmp_path, store_path):
    """Failures of what a command is given or talks to (a file system refusing, a corrupt store, a bad
    results file, a tracking server that is down, an empty registry): `error: ...` in one line, exit 1."""
    from support.net import free_port

    broken = tmp_path / "broken.zarr"
    shutil.copytree(store_path, broken)
    (broken / "cases" / "0" / "image" / "zarr.json").write_text("garbage")
    (tmp_path / "bad.json").write_text("[1]")
    down = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    empty = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"}
    cases = [
        (["synth", "--out", "/proc/liverseg-test", "--cases", "1"], {}, "/proc/liverseg-test"),
        (["ingest", "--raw", "-", "--store", str(broken), "--verify"], {}, "case 0: no readable 'image' array"),
        (["evaluate", "--store", store_path, "--model-from", str(tmp_path / "bad.json")], {}, "bad.json: not a"),
        (["score", "--pred", str(tmp_path), "--ref", str(tmp_path)], {}, "cannot read (Is a directory)"),
        (["lineage", "models:/liver-unet@champion"], down, "is not reachable"),
        (["history"], down, "is not reachable"),
        (["rollback"], empty, "liver-unet: no champion to roll back"),
        (["history"], {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty2.db'}"}, "no such registered model, no"),
        (["publish", "--to", "s3://lake/x.zarr"], {}, "give --store to publish, --keep N"),
    ]

    def run(args, env):
        cmd = [sys.executable, "-m", "liverseg.cli", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})

    with ThreadPoolExecutor(3) as pool:  # independent commands (a store each): mostly start-up, overlapped
        results = list(pool.map(lambda c: run(c[0], c[1]), cases))
    for (args, _, says), res in zip(cases, results):
        last = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""
        assert res.returncode in (1, 2) and "Traceback" not in res.stderr and "╭" not in res.stderr, (args, res.stderr)
        assert says in last and (last.startswith("error: ") or args[0] == "ingest"), (args, res.stderr)


def test_foreign_failures_are_named_in_one_line():
    from liverseg.cli.app import expected_failure

    assert expected_failure(MemoryError()).startswith("out of memory (MemoryError)")
    assert expected_failure(PermissionError(13, "Permission denied", "/x/y")) == "/x/y: Permission denied"
    assert expected_failure(ValueError("a bug")) is None  # anything else keeps its traceback
