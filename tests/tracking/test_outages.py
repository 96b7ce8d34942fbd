"""What liverseg commands say, and how soon, when the tracking server refuses the login or a permission,
or when it (or the PostgreSQL or S3 server behind it) is down: one line naming the server and the user,
in seconds (MLflow's own retries took about 4 minutes, and a wrong password read as "not found").

One stack for the module (`outage` in conftest: PostgreSQL, S3, MLflow with basic-auth); the tests run in
file order and stop its parts one after the other: the database (then restarted), S3, MLflow."""

from __future__ import annotations

import json
import re
import time

import nibabel as nib
import numpy as np
import pytest

from support.cli import run_liverseg

pytestmark = pytest.mark.slow
SLOW_S = 90.0  # "seconds, not minutes": start-up (~5 s) and the retries; MLflow's defaults took ~250 s
TIMES: dict[str, dict[str, float]] = {}  # fault -> command -> seconds to fail, printed at the end


def _commands(outage, tmp_path) -> dict[str, list[str]]:
    ct = tmp_path / "ct.nii.gz"
    if not ct.exists():
        nib.save(nib.Nifti1Image(np.full((24, 24, 4), 40, np.int16), np.eye(4)), str(ct))
    champion = "models:/liver-unet@champion"
    return {
        "promote": ["promote", "--store", outage.store, "--min-dice", "0"],
        "predict": ["predict", str(ct), str(tmp_path / "mask.nii.gz"), "--model", champion, "--device", "cpu"],
        "register": ["register", "--run", outage.runs[1]],
        "evaluate": ["evaluate", "--store", outage.store, "--model", champion, "--out", str(tmp_path / "m.json")]
        + ["--cases-csv", str(tmp_path / "c.csv"), "--device", "cpu"],
        "lineage": ["lineage", champion],
        "history": ["history"],
    }


def _fails(args: list[str], env: dict[str, str]) -> tuple[str, float]:
    """Run a command that must fail: (its last stderr line, seconds); no traceback, exit 1."""
    t0 = time.monotonic()
    res = run_liverseg(args, env, timeout_s=300)
    seconds = time.monotonic() - t0
    assert res.returncode == 1, f"{args[0]}: exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    return res.stderr.strip().splitlines()[-1], seconds


def test_a_wrong_password_is_reported_as_such(outage, tmp_path):
    for name, args in _commands(outage, tmp_path).items():
        line, seconds = _fails(args, outage.env("rita", "wrong-password"))
        assert "401" in line and "rita" in line and "not found" not in line, (name, line)
        assert outage.server.uri in line or name == "promote", (name, line)
        TIMES.setdefault("wrong password", {})[name] = round(seconds, 1)


def test_a_missing_permission_is_reported_as_such(outage, tmp_path):
    for name in ("lineage", "predict"):
        line, _ = _fails(_commands(outage, tmp_path)[name], outage.env("nobody"))
        assert "refused user nobody (403)" in line and outage.server.uri in line, (name, line)


def test_the_database_down_is_reported_in_seconds(outage, tmp_path):
    outage.pg.stop()
    try:
        for name, args in _commands(outage, tmp_path).items():
            line, seconds = _fails(args, outage.env())
            assert outage.server.uri in line and re.search(r"answered 5\d\d to every try", line), (name, line)
            assert seconds < SLOW_S, (name, seconds)
            TIMES.setdefault("PostgreSQL down", {})[name] = round(seconds, 1)
    finally:
        outage.pg.start()
    res = run_liverseg(["history"], outage.env())  # and back once it is
    assert res.returncode == 0 and "promote" in res.stdout, res.stderr


def test_the_artifact_store_down_is_reported_in_seconds(outage, tmp_path):
    outage.s3.stop()
    for name in ("predict", "evaluate"):  # the ones that download the model's files through MLflow
        line, seconds = _fails(_commands(outage, tmp_path)[name], outage.env())
        assert outage.server.uri in line and re.search(r"answered 5\d\d to every try", line), (name, line)
        assert seconds < SLOW_S, (name, seconds)
        TIMES.setdefault("S3 down", {})[name] = round(seconds, 1)


def test_the_tracking_server_down_is_reported_in_seconds(outage, tmp_path):
    outage.server.stop()
    for name, args in _commands(outage, tmp_path).items():
        line, seconds = _fails(args, outage.env())
        assert f"tracking server {outage.server.uri} is not reachable" in line or name == "promote", (name, line)
        assert seconds < SLOW_S, (name, seconds)
        TIMES.setdefault("MLflow down", {})[name] = round(seconds, 1)
    print("\nseconds to fail:", json.dumps(TIMES))
