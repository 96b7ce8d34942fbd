"""A slice store published to a real (moto) S3 server and read back from s3:// by the reader Ray workers use."""

import subprocess
import sys

import boto3
import numpy as np

from liverseg.data.publish import publish_store
from liverseg.data.store import SliceStore

CLI = [sys.executable, "-m", "liverseg.cli"]


def test_publish_then_read_from_s3_incrementally(s3, store_path, tmp_path):
    url = f"{s3}/stores/slices.zarr"
    first = publish_store(store_path, url)
    assert first.uploaded and not first.unchanged and first.uploaded[-1] == "zarr.json"
    local, remote = SliceStore(store_path), SliceStore(url)
    assert remote.cases == local.cases and remote.splits == local.splits
    case = local.cases_in("train")[0]
    for a, b in zip(remote.volume(case), local.volume(case)):
        np.testing.assert_array_equal(a, b)
    assert remote.verify() == {}  # every stored array hashes as ingest recorded
    check = subprocess.run([*CLI, "ingest", "--raw", "-", "--store", url, "--verify"], capture_output=True, text=True)
    assert check.returncode == 0 and "verify: 0 case(s) with problems" in check.stdout, check.stderr

    boto3.client("s3").put_object(Bucket="lake", Key="stores/slices.zarr/notes.txt", Body=b"someone else's")
    again = subprocess.run(
        [*CLI, "publish", "--store", store_path, "--to", url],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr
    assert f"0 uploaded, {len(first.uploaded)} unchanged" in again.stdout and "1 object(s) there" in again.stdout
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="lake")["Contents"]}
    assert "stores/slices.zarr/notes.txt" in keys  # not the user's to lose


def test_publish_refuses_non_stores_and_paths(s3, tmp_path, store_path):
    import pytest

    from liverseg.core.errors import StoreError

    with pytest.raises(StoreError, match="cannot open slice store"):
        publish_store(tmp_path / "nothing.zarr", f"{s3}/x.zarr")
    with pytest.raises(StoreError, match="expected an object-store URL"):
        publish_store(store_path, str(tmp_path / "copy.zarr"))
    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket="lake")  # nothing half written


def test_ingest_into_a_bucket_is_refused_with_the_way(s3, phantom_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = subprocess.run(
        [*CLI, "ingest", "--raw", str(phantom_dir), "--store", f"{s3}/x.zarr"], capture_output=True, text=True
    )
    assert res.returncode == 1 and "liverseg publish --store FOLDER --to s3://lake/x.zarr" in res.stderr
    errors = [line for line in res.stderr.splitlines() if "liverseg publish" in line]
    assert len(errors) == 1 and not [p for p in tmp_path.iterdir() if p.name.startswith("s3")]  # no local 's3:' folder
