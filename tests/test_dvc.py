"""The repo's DVC ingest stage, run with `dvc repro` in a temporary git repo, plus a local remote."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO, copy_case

BIN = Path(sys.executable).parent


def _run(cmd, cwd, **kw):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{cmd}: {res.stdout[-2000:]} {res.stderr[-2000:]}"
    return res.stdout


def test_dvc_repro_ingest_stage(tmp_path, phantom_dir):
    repo = tmp_path / "repo"
    for n in ("0", "1", "2"):
        copy_case(phantom_dir, repo / "data" / "lits", n)
    shutil.copytree(REPO / "pipelines", repo / "pipelines")
    for f in ("ingest.py", "lits.py", "store.py"):
        (repo / "platform" / "liverseg").mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "platform" / "liverseg" / f, repo / "platform" / "liverseg" / f)
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    spec["stages"] = {"ingest": spec["stages"]["ingest"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec))
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    _run(["dvc", "config", "core.site_cache_dir", str(tmp_path / "site-cache")], repo)
    _run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], repo)
    out = _run(["dvc", "repro"], repo)
    assert "Running stage 'ingest'" in out
    assert (repo / "data" / "store.zarr" / "zarr.json").exists()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    params = lock["stages"]["ingest"]["params"]
    assert params["pipelines/ingest.yaml"]["workers"] == 2 and params["pipelines/profile.yaml"]["profile"] == "demo"
    assert "demo.ingest" in params["pipelines/profiles.yaml"]
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], repo)
    assert "didn't change" in _run(["dvc", "repro"], repo)  # nothing re-runs
    from liverseg.store import SliceStore
    from liverseg.tracking import dvc_hash

    assert SliceStore(str(repo / "data" / "store.zarr")).size == (64, 64)  # the demo profile applied
    md5 = dvc_hash(repo / "data" / "store.zarr", repo / "dvc.lock")
    assert md5.endswith(".dir") and md5 == lock["stages"]["ingest"]["outs"][0]["md5"]
    _run(["dvc", "push", "-q"], repo)
    assert "in sync" in _run(["dvc", "status", "-c"], repo)
    shutil.rmtree(repo / "data" / "store.zarr")
    _run(["dvc", "pull", "-q"], repo)
    assert SliceStore(str(repo / "data" / "store.zarr")).verify() == {}


def test_repo_data_dvc_matches_the_demo_phantoms():
    """data.dvc's hash is what `liverseg synth` produces for the demo seed (so a fresh clone is clean)."""
    spec = yaml.safe_load((REPO / "data.dvc").read_text())
    assert spec["outs"][0]["path"] == "data/lits" and spec["outs"][0]["nfiles"] == 40
    demo = (REPO / "scripts" / "demo.sh").read_text()
    assert "--cases 20 --seed 0 --shape 96 96 40" in demo


def test_dvc_push_pull_round_trip_through_s3(tmp_path, phantom_dir, s3):
    """The team remote: `dvc push` to s3://lake/dvc on the shared object store, `dvc pull` into a clone."""
    import boto3

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    repo = tmp_path / "repo"
    copy_case(phantom_dir, repo / "data" / "lits", "0")
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    _run(["dvc", "config", "core.site_cache_dir", str(tmp_path / "site-cache")], repo)
    _run(["dvc", "remote", "add", "-d", "s3remote", f"{s3}/dvc"], repo)
    _run(["dvc", "remote", "modify", "s3remote", "endpointurl", endpoint], repo)
    _run(["dvc", "add", "-q", "data/lits"], repo)
    _run(["dvc", "push", "-q"], repo)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="lake", Prefix="dvc/")["Contents"]]
    assert len(keys) == 3  # the directory manifest and the two NIfTI files, content-addressed
    before = {p.name: p.read_bytes() for p in (repo / "data" / "lits").iterdir()}
    shutil.rmtree(repo / "data" / "lits")
    shutil.rmtree(repo / ".dvc" / "cache")
    _run(["dvc", "pull", "-q"], repo)
    assert {p.name: p.read_bytes() for p in (repo / "data" / "lits").iterdir()} == before
    assert "in sync" in _run(["dvc", "status", "-c"], repo)
