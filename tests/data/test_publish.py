"""A slice store published to a real (moto) S3 server as immutable versions behind a pointer, and read back
from s3:// by the reader Ray workers use: never a mix of two versions, whatever a publish is doing."""

import json
import shutil

import boto3
import numpy as np
import pytest

from liverseg.core.config import IngestConfig
from liverseg.core.errors import StoreError
from liverseg.data.ingest import ingest
from liverseg.data.publish import publish_store
from liverseg.data.store import SliceStore
from support.cli import run_liverseg
from support.nifti import copy_case


def _keys(prefix: str = "") -> set[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="lake", Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _content(st: SliceStore) -> dict[str, tuple[str, str]]:
    """What a reader sees: every case's (image, mask) sha256, read from the arrays themselves."""
    from liverseg.data.store import array_sha256

    return {c: tuple(array_sha256(a) for a in st.volume(c)) for c in st.cases}


def _changed(old, new) -> list[str]:
    """Keys of the files of store `new` that `old` lacks or holds other bytes under."""
    files = sorted(p.relative_to(new).as_posix() for p in new.rglob("*") if p.is_file())
    return [k for k in files if not (old / k).is_file() or (old / k).read_bytes() != (new / k).read_bytes()]


@pytest.fixture
def update(store_path, phantom_dir, tmp_path):
    """(old store, updated copy): the copy has case 1 replaced by other scans and a new case 6."""
    old, new, raw = tmp_path / "old.zarr", tmp_path / "new.zarr", tmp_path / "raw"
    shutil.copytree(store_path, old)
    shutil.copytree(store_path, new)
    for n in ("0", "2", "3", "4", "5"):
        copy_case(phantom_dir, raw, n)
    copy_case(phantom_dir, raw, "2", new_id="1")  # changed scans of case 1
    copy_case(phantom_dir, raw, "0", new_id="6")  # a new case
    assert ingest(raw, new, IngestConfig(size=(64, 64), workers=2), progress=False).ok
    return old, new


def test_publish_then_read_from_s3_incrementally(s3, store_path, tmp_path):
    url = f"{s3}/stores/slices.zarr"
    first = publish_store(store_path, url)
    assert first.uploaded and not first.reused and first.previous is None and first.versions == 1
    local, remote = SliceStore(store_path), SliceStore(url)
    assert remote.version == first.version and remote.pinned_url == f"{url}/versions/{first.version}"
    assert remote.cases == local.cases and remote.splits == local.splits
    case = local.cases_in("train")[0]
    for a, b in zip(remote.volume(case), local.volume(case)):
        np.testing.assert_array_equal(a, b)
    assert remote.verify() == {}  # every stored array hashes as ingest recorded, every object is there
    check = run_liverseg(["ingest", "--raw", "-", "--store", url, "--verify"])
    assert check.returncode == 0 and "verify: 0 case(s) with problems" in check.stdout, check.stderr

    boto3.client("s3").put_object(Bucket="lake", Key="stores/slices.zarr/notes.txt", Body=b"someone else's")
    again = run_liverseg(["publish", "--store", store_path, "--to", url])
    assert again.returncode == 0, again.stderr
    assert f"{url} is already at version {first.version} (6 cases); nothing uploaded" in again.stdout
    assert "kept at s3://lake/stores/slices.zarr, not part of any version: notes.txt" in again.stdout
    assert "stores/slices.zarr/notes.txt" in _keys()  # not the user's to lose


def test_a_reader_sees_one_whole_version_during_and_after_an_update(s3, update):
    """Mid-publish (after every single upload) a new reader sees the old version whole; a reader opened
    before the publish keeps reading the old one after it; a new reader after it sees the new one whole."""
    old, new = update
    url = f"{s3}/stores/lits.zarr"
    v1 = publish_store(old, url)
    before, want_old, want_new = SliceStore(url), _content(SliceStore(str(old))), _content(SliceStore(str(new)))
    seen = []

    def reader(key):  # called after each object of the update is uploaded, the pointer not yet swapped
        st = SliceStore(url)
        seen.append((key, st.version, st.cases, _content(st)))

    v2 = publish_store(new, url, progress=reader)
    assert v2.previous == v1.version != v2.version and len(seen) == len(v2.uploaded)
    # only what changed is sent (case 1's data and attributes, new case 6, the root); the rest is referred to
    assert v2.uploaded == _changed(old, new) and {k.split("/")[1] for k in v2.uploaded if "/" in k} == {"1", "6"}
    assert len(v2.reused) == len(v1.uploaded) - len([k for k in v2.uploaded if "/6/" not in k])
    for key, version, cases, content in seen:
        assert (version, cases, content) == (v1.version, before.cases, want_old), key
    assert _content(before) == want_old and before.version == v1.version  # opened before: still the old one
    after = SliceStore(url)
    assert after.version == v2.version and _content(after) == want_new and after.verify() == {}
    pinned = SliceStore(f"{url}/versions/{v1.version}")  # the old version stays readable, pinned
    assert _content(pinned) == want_old and pinned.verify() == {}


def test_an_interrupted_update_leaves_the_old_version_and_a_rerun_sends_the_rest(s3, update):
    old, new = update
    url = f"{s3}/stores/lits.zarr"
    v1 = publish_store(old, url)
    want_old = _content(SliceStore(str(old)))
    sent = []

    def cut(key):  # the connection is lost after the third object
        sent.append(key)
        if len(sent) == 3:
            raise ConnectionError("connection reset by peer")

    with pytest.raises(StoreError, match=f"stopped after 3 of .* upload.*version {v1.version} stays current") as e:
        publish_store(new, url, progress=cut)
    v2 = str(e.value).split("publish of version ")[1].split()[0]
    st = SliceStore(url)
    assert st.version == v1.version and _content(st) == want_old and st.verify() == {}
    there = {k.split("/files/", 1)[1] for k in _keys(f"stores/lits.zarr/versions/{v2}/files/")}
    rest = publish_store(new, url)  # sends what had not arrived (uploads in flight when it broke finished)
    assert rest.version == v2 and rest.previous == v1.version and set(sent) <= there and not set(rest.uploaded) & there
    assert set(rest.uploaded) | (there & set(_changed(old, new))) == set(_changed(old, new))
    assert SliceStore(url).verify() == {} and _content(SliceStore(url)) == _content(SliceStore(str(new)))


def test_old_versions_stay_until_asked_and_keep_deletes_only_theirs(s3, update):
    old, new = update
    url = f"{s3}/stores/lits.zarr"
    v1, v2 = publish_store(old, url), publish_store(new, url)
    listed = run_liverseg(["publish", "--to", url, "--list"])
    lines = listed.stdout.splitlines()
    assert listed.returncode == 0 and len(lines) == 2, listed.stdout + listed.stderr
    assert lines[0].startswith(v2.version) and lines[0].endswith("(current)") and lines[1].startswith(v1.version)
    back = publish_store(old, url)  # the old content again: its version, made current, nothing sent
    assert back.version == v1.version and not back.uploaded and back.versions == 2
    publish_store(new, url)
    pruned = run_liverseg(["publish", "--to", url, "--keep", "1"])
    assert pruned.returncode == 0 and "deleted 1 old version(s)" in pruned.stdout, pruned.stderr
    assert not _keys(f"stores/lits.zarr/versions/{v1.version}/manifest.json")
    st = SliceStore(url)
    assert st.version == v2.version and st.verify() == {}  # v2's objects that v1 uploaded are still there
    with pytest.raises(StoreError, match="no such version"):
        SliceStore(f"{url}/versions/{v1.version}")


def test_a_store_uploaded_before_versions_still_reads_and_is_kept(s3, store_path):
    """An unversioned upload (what publish wrote before) is read in place; a publish adds a version beside
    it, readers follow the version, the old objects are kept and named."""
    import fsspec

    url = f"{s3}/stores/legacy.zarr"
    fsspec.filesystem("s3").put(f"{store_path}/", "lake/stores/legacy.zarr", recursive=True)
    st = SliceStore(url)
    assert st.version is None and st.pinned_url == url and st.verify() == {}
    res = run_liverseg(["publish", "--store", store_path, "--to", url])
    assert res.returncode == 0 and "not part of any version: cases, zarr.json" in res.stdout, res.stdout + res.stderr
    assert SliceStore(url).version is not None and "stores/legacy.zarr/zarr.json" in _keys()


@pytest.mark.parametrize(
    "key, body, says",
    [
        ("current.json", b"not json", "version pointer is not JSON"),
        ("current.json", b"[1, 2]", "version pointer is not a JSON object"),
        ("current.json", b'{"format": "x"}', "not a liverseg version pointer"),
        ("manifest", b'{"format": "liverseg-store-version", "format_version": 1, "files": []}', "'files' is not"),
        ("object", "../../../other/zarr.json", "is not versions/<VID>/files/zarr.json"),
        ("object", "versions/0123456789abcdef/files/cases/zarr.json", "is not versions/<VID>/files/zarr.json"),
        ("key", "../escape", "is not a store key"),
    ],
)
def test_tampered_pointer_or_manifest_is_one_line(s3, store_path, key, body, says):
    url = f"{s3}/stores/t.zarr"
    vid = publish_store(store_path, url).version
    s3c = boto3.client("s3")
    mkey = f"stores/t.zarr/versions/{vid}/manifest.json"
    if key == "current.json":
        s3c.put_object(Bucket="lake", Key="stores/t.zarr/current.json", Body=body)
    else:
        manifest = json.loads(s3c.get_object(Bucket="lake", Key=mkey)["Body"].read())
        if key == "manifest":
            manifest = json.loads(body)
        elif key == "object":
            manifest["files"]["zarr.json"]["object"] = body
        else:
            manifest["files"][body] = manifest["files"]["zarr.json"]
        s3c.put_object(Bucket="lake", Key=mkey, Body=json.dumps(manifest).encode())
    with pytest.raises(StoreError, match=says) as e:
        SliceStore(url)
    assert "\n" not in str(e.value)
    if body == b"not json":  # the command says the same, in one line
        res = run_liverseg(["ingest", "--raw", "-", "--store", url, "--verify"])
        assert res.returncode == 1 and res.stderr.count("\n") == 1 and says in res.stderr, res.stderr


def test_publish_refuses_non_stores_and_paths(s3, tmp_path, store_path):
    with pytest.raises(StoreError, match="cannot open slice store"):
        publish_store(tmp_path / "nothing.zarr", f"{s3}/x.zarr")
    with pytest.raises(StoreError, match="expected an object-store URL"):
        publish_store(store_path, str(tmp_path / "copy.zarr"))
    with pytest.raises(StoreError, match="names one published version, which never changes"):
        publish_store(store_path, f"{s3}/x.zarr/versions/0123456789abcdef")
    with pytest.raises(StoreError, match="a local path; on a shared file system"):
        publish_store(store_path, f"file://{tmp_path}/x.zarr")
    assert not _keys()  # nothing half written


def test_ingest_into_a_bucket_is_refused_with_the_way(s3, phantom_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run_liverseg(["ingest", "--raw", str(phantom_dir), "--store", f"{s3}/x.zarr"])
    assert res.returncode == 1 and "liverseg publish --store FOLDER --to s3://lake/x.zarr" in res.stderr
    errors = [line for line in res.stderr.splitlines() if "liverseg publish" in line]
    assert len(errors) == 1 and not [p for p in tmp_path.iterdir() if p.name.startswith("s3")]  # no local 's3:' folder
