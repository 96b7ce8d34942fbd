import subprocess
import sys


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "liverseg.cli", *args], capture_output=True, text=True)


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
    assert line.startswith("error: unknown key 'train.epochz'") and "train.epochs" in line and "\n" not in line


def test_missing_store_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    res = _cli("train", "--store", str(tmp_path / "nope.zarr"))
    assert res.returncode == 1 and "nope.zarr" in res.stderr and "Traceback" not in res.stderr


def test_import_has_no_side_effects(tmp_path):
    code = "import os, liverseg.cli, liverseg.train, liverseg.tune, liverseg.serve, liverseg.registry; print(sorted(os.listdir('.')))"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "[]"


def test_fault_injection_is_not_a_user_setting():
    from liverseg.config import TrainConfig, valid_keys

    assert "run.fail_at_epoch" not in valid_keys(TrainConfig)
    res = _cli("train", "--store", "x", "--set", "run.fail_at_epoch=1")
    assert res.returncode == 2 and "unknown key 'run.fail_at_epoch'" in res.stderr


def test_model_errors_are_one_line(tmp_path):
    """Every command reports liverseg's errors through one handler: `error: ...`, exit 1, no traceback."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "liverseg.json").write_text('{"format_version": 99}')
    for model, says in ((str(tmp_path / "nope"), "not a model folder"), (str(tmp_path / "m"), "format version 99")):
        res = _cli("predict", str(tmp_path / "ct.nii.gz"), str(tmp_path / "out.nii.gz"), "--model", model)
        assert res.returncode == 1 and res.stderr.startswith("error: ") and says in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
