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
