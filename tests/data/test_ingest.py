"""Ingest: real CT, incremental and atomic behaviour, and the table of broken inputs."""

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from liverseg.core.config import IngestConfig
from liverseg.core.errors import StoreError
from liverseg.data.ingest import ingest
from liverseg.data.store import SliceStore
from liverseg.data.store_folder import TMP_PREFIX
from support.cli import cli_cmd
from support.nifti import copy_case, nifti2_declaring


def test_real_ct_ingest(tmp_path, real_ct):
    rep = ingest(real_ct, tmp_path / "s.zarr", IngestConfig(workers=1), progress=False)
    assert rep.ok and rep.written == ["0"]
    st = SliceStore(str(tmp_path / "s.zarr"))
    img, msk = st.volume("0")
    assert img.shape == (30, 128, 128) and msk.max() == 1
    a = st.case_attrs("0")
    assert a["spacing_mm"] == pytest.approx([3.0, 3.0, 3.0])
    assert a["stored_spacing_mm_zyx"] == pytest.approx([3.0, 3.0 * 101 / 128, 3.0 * 122 / 128])


def test_incremental_and_changed_source(tmp_path, phantom_dir):
    raw = tmp_path / "raw"
    for n in ("0", "1", "2"):
        copy_case(phantom_dir, raw, n)
    cfg = IngestConfig(size=(32, 32), workers=2)
    first = ingest(raw, tmp_path / "s.zarr", cfg, progress=False)
    assert sorted(first.written) == ["0", "1", "2"]
    again = ingest(raw, tmp_path / "s.zarr", cfg, progress=False)
    assert again.written == [] and sorted(again.skipped) == ["0", "1", "2"]
    copy_case(phantom_dir, raw, "3", new_id="1")  # case 1's source changes
    third = ingest(raw, tmp_path / "s.zarr", cfg, progress=False)
    assert third.written == ["1"]
    (raw / "volume-2.nii.gz").unlink()
    (raw / "segmentation-2.nii.gz").unlink()
    fourth = ingest(raw, tmp_path / "s.zarr", cfg, progress=False)  # a vanished source is not a removal order
    assert SliceStore(str(tmp_path / "s.zarr")).cases == ["0", "1", "2"] and fourth.ok and fourth.kept == ["2"]
    fifth = ingest(raw, tmp_path / "s.zarr", cfg, progress=False, prune=True)
    assert SliceStore(str(tmp_path / "s.zarr")).cases == ["0", "1"] and fifth.ok and fifth.pruned == ["2"]
    assert not (tmp_path / "s.zarr" / "cases" / "2").exists()
    assert SliceStore(str(tmp_path / "s.zarr")).verify() == {}


def _save(path: Path, arr, affine=None):
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))


def _broken_inputs(raw: Path, good: Path) -> dict[str, str]:
    """Write one broken case per kind into raw; returns {case id: expected message fragment}."""
    vol = np.asanyarray(nib.load(str(good / "volume-0.nii.gz")).dataobj)
    seg = np.asanyarray(nib.load(str(good / "segmentation-0.nii.gz")).dataobj)
    aff = nib.load(str(good / "volume-0.nii.gz")).affine
    expect = {}
    data = (good / "volume-0.nii.gz").read_bytes()
    (raw / "volume-10.nii.gz").write_bytes(data[: len(data) // 2])  # truncated gzip
    shutil.copy(good / "segmentation-0.nii.gz", raw / "segmentation-10.nii.gz")
    expect["10"] = "cannot decode"
    (raw / "volume-11.nii").write_bytes(b"this is not a nifti file at all" * 20)
    shutil.copy(good / "segmentation-0.nii.gz", raw / "segmentation-11.nii.gz")
    expect["11"] = "not a NIfTI"
    _save(raw / "volume-12.nii.gz", vol[:, :, 0])
    _save(raw / "segmentation-12.nii.gz", seg[:, :, 0])
    expect["12"] = "2-D image"
    _save(raw / "volume-13.nii.gz", np.stack([vol, vol], -1), aff)
    shutil.copy(good / "segmentation-0.nii.gz", raw / "segmentation-13.nii.gz")
    expect["13"] = "4-D image holding 2 volumes"
    _save(raw / "volume-14.nii.gz", vol, aff)
    _save(raw / "segmentation-14.nii.gz", seg[:, :, :-1], aff)
    expect["14"] = "shape"
    _save(raw / "volume-15.nii.gz", vol, aff)
    shifted = aff.copy()
    shifted[0, 3] += 5
    _save(raw / "segmentation-15.nii.gz", seg, shifted)
    expect["15"] = "affine differs"
    _save(raw / "volume-16.nii.gz", vol, aff)
    bad = seg.copy()
    bad[0, 0, 0] = 7
    _save(raw / "segmentation-16.nii.gz", bad, aff)
    expect["16"] = "labels [7]"
    nan = vol.astype(np.float32)
    nan[1, 1, 1] = np.nan
    _save(raw / "volume-17.nii.gz", nan, aff)
    shutil.copy(good / "segmentation-0.nii.gz", raw / "segmentation-17.nii.gz")
    expect["17"] = "non-finite"
    (raw / "volume-18.nii.gz").write_bytes(b"")
    shutil.copy(good / "segmentation-0.nii.gz", raw / "segmentation-18.nii.gz")
    expect["18"] = "empty file"
    shutil.copy(good / "volume-0.nii.gz", raw / "volume-19.nii.gz")
    expect["19"] = "missing segmentation-19"
    shutil.copy(good / "volume-0.nii.gz", raw / "volume-20.nii.gz")
    (raw / "volume-20.nii").write_bytes(gzip.decompress((good / "volume-0.nii.gz").read_bytes()))
    shutil.copy(good / "segmentation-0.nii.gz", raw / "segmentation-20.nii.gz")
    expect["volume-20.nii"] = "duplicate case id 20"
    axial_first = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)  # file axis 0 is S
    for n, dims, a in (("31", (1, 1, 4000), None), ("32", (4000, 1, 1), axial_first)):  # a few kB, 4000 slices
        _save(raw / f"volume-{n}.nii.gz", np.zeros(dims, np.int16), a)
        _save(raw / f"segmentation-{n}.nii.gz", np.zeros(dims, np.uint8), a)
        expect[n] = f"volume-{n}.nii.gz: 4000 axial slices exceed the limit of 2048"
    (raw / "volume-33.nii").write_bytes(nifti2_declaring((2**62, 4, 1)))  # the voxel count overflowed int64
    shutil.copy(good / "segmentation-0.nii.gz", raw / "segmentation-33.nii.gz")
    expect["33"] = "volume-33.nii: declared shape (4611686018427387904, 4, 1) of uint8 exceeds the data"
    (raw / "segmentation-21.nii.gz").write_bytes(b"x")
    expect["segmentation-21.nii.gz"] = "without volume-21"
    return expect


def test_broken_inputs_each_reported_good_ones_written(tmp_path, phantom_dir, capsys):
    raw = tmp_path / "raw"
    copy_case(phantom_dir, raw, "0")
    copy_case(phantom_dir, raw, "1")
    one = gzip.decompress((raw / "volume-1.nii.gz").read_bytes())  # as bgzip writes it: two gzip members
    (raw / "volume-1.nii.gz").write_bytes(gzip.compress(one[:1000]) + gzip.compress(one[1000:]))
    expect = _broken_inputs(raw, phantom_dir)
    rep = ingest(raw, tmp_path / "s.zarr", IngestConfig(size=(32, 32), workers=2), progress=False)
    assert sorted(rep.written) == ["0", "1"]
    assert SliceStore(str(tmp_path / "s.zarr")).cases == ["0", "1"]
    assert set(rep.failed) == set(expect), rep.failed
    for key, fragment in expect.items():
        msg = rep.failed[key]
        assert fragment in msg, (key, msg)
        assert "\n" not in msg and ".nii" in msg  # one line naming the file
    assert not list((tmp_path / "s.zarr" / "cases").glob(f"{TMP_PREFIX}*"))


def test_cli_exit_status_and_summary(tmp_path, phantom_dir):
    import subprocess

    raw = tmp_path / "raw"
    copy_case(phantom_dir, raw, "0")
    (raw / "volume-3.nii.gz").write_bytes(b"")
    (raw / "segmentation-3.nii.gz").write_bytes(b"")
    cmd = cli_cmd("ingest", tmp_path / "s.zarr", "size=[32,32]", "workers=1", raw=raw)
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 1
    assert "FAILED volume-3.nii.gz: empty file" in res.stderr
    assert "1 written, 0 unchanged, 1 failed" in res.stdout
    bad = subprocess.run(
        cli_cmd("ingest", tmp_path / "s.zarr", "sise=[32,32]", raw=raw), capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown key 'sise'" in bad.stderr and "size" in bad.stderr


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_interrupted_case_leaves_nothing_half_written(tmp_path, phantom_dir, sig):
    """SIGKILL or Ctrl-C mid-ingest: the rerun removes the temporary groups and completes every case."""
    import os
    import signal
    import subprocess
    import time

    raw = tmp_path / "raw"
    from liverseg.data.phantoms import write_phantoms

    write_phantoms(raw, 4, seed=11, shape=(96, 96, 48))
    store = tmp_path / "s.zarr"
    cmd = cli_cmd("ingest", store, "workers=1", raw=raw)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (store.exists() and list((store / "cases").glob("*"))):
        time.sleep(0.05)  # kill once the first case is being written
    os.killpg(proc.pid, getattr(signal, sig))
    proc.wait()
    deadline = time.time() + 30  # its spawned worker too (it held the store's lock): gone, not only signalled
    while time.time() < deadline and subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).stdout:
        time.sleep(0.05)
    for group in (store / "cases").glob("[0-9]*"):  # whatever was renamed into place is complete
        assert (group / "image" / "zarr.json").exists() and (group / "mask" / "zarr.json").exists()
    rep = ingest(raw, store, IngestConfig(workers=1), progress=False)
    assert rep.ok
    st = SliceStore(str(store))
    assert st.cases == ["0", "1", "2", "3"] and st.verify() == {}
    assert not list((store / "cases").glob(f"{TMP_PREFIX}*"))


def test_verify_detects_truncated_shard(tmp_path, phantom_dir):
    raw = tmp_path / "raw"
    copy_case(phantom_dir, raw, "0")
    copy_case(phantom_dir, raw, "1")
    store = tmp_path / "s.zarr"
    assert ingest(raw, store, IngestConfig(size=(32, 32), workers=1), progress=False).ok
    shard = next((store / "cases" / "1" / "image").rglob("c/*/*/*"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    problems = SliceStore(str(store)).verify()
    assert list(problems) == ["1"] and "case 1" in problems["1"]
    from liverseg.core.errors import StoreError

    with pytest.raises(StoreError, match="case 1"):
        SliceStore(str(store)).volume("1")


def test_ingest_workers_import_neither_torch_nor_pydantic(tmp_path, phantom_dir):
    """Start-up of each spawned worker is what small ingests pay for; importing torch alone is seconds."""
    import subprocess
    import sys

    code = (
        "import sys; from liverseg.data.ingest import ingest_case; from liverseg.data.lits import discover\n"
        f"case = discover({str(phantom_dir)!r})[0][0]\n"
        f"print(ingest_case(case, {str(tmp_path)!r}, (32, 32), 8)[1], 'torch' in sys.modules, 'pydantic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) > 0 and out[1:] == ["False", "False"]


def _cli(*args: str, **kw):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "liverseg.cli", *args], capture_output=True, text=True, **kw)


def _tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("content", ["empty", "not-lits", "only-segmentations"])
def test_raw_folder_without_cases_touches_nothing(tmp_path, phantom_dir, content):
    """Pointing ingest at the wrong folder once deleted every case and exited 0."""
    good = tmp_path / "good"
    copy_case(phantom_dir, good, "0")
    copy_case(phantom_dir, good, "1")
    store = tmp_path / "s.zarr"
    assert ingest(good, store, IngestConfig(size=(32, 32), workers=1), progress=False).ok
    before = _tree(store)
    raw = tmp_path / "raw"
    raw.mkdir()
    if content == "not-lits":
        shutil.copy(phantom_dir / "volume-0.nii.gz", raw / "ct.nii.gz")
    elif content == "only-segmentations":
        shutil.copy(phantom_dir / "segmentation-0.nii.gz", raw / "segmentation-0.nii.gz")
    for target in (store, tmp_path / "new.zarr"):
        res = _cli("ingest", "--raw", str(raw), "--store", str(target), "--set", "size=[32,32]", "--prune")
        assert res.returncode == 1, res.stdout
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "no LiTS cases" in errors[0] and str(raw) in errors[0], res.stderr
    assert _tree(store) == before and not (tmp_path / "new.zarr").exists()
    assert SliceStore(str(store)).cases == ["0", "1"]


def _rebuild_and_kill(raw: Path, store: Path) -> None:
    """Start a re-ingest at a new size; SIGKILL it once its first rebuilt case is in place."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "liverseg.cli", "ingest", "--raw", str(raw), "--store", str(store)]
    proc = subprocess.Popen(
        [*cmd, "--set", "size=[48,48]", "--set", "workers=1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    beside = lambda: list(store.parent.glob(f".{store.name}.new-*/cases/[0-9]*"))  # noqa: E731
    in_place = lambda: [g for g in (store / "cases").glob("[0-9]*") if '"size": [48' in (g / "zarr.json").read_text()]  # noqa: E731
    while time.time() < deadline and proc.poll() is None and not beside() and not in_place():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_geometry_change_killed_midway_leaves_the_old_store(tmp_path):
    """A new `size` rebuilds beside the store: SIGKILL midway leaves the old one whole and consistent."""
    from liverseg.data.phantoms import write_phantoms

    raw = tmp_path / "raw"
    write_phantoms(raw, 4, seed=11, shape=(96, 96, 48))
    store = tmp_path / "s.zarr"
    assert ingest(raw, store, IngestConfig(size=(32, 32), workers=2), progress=False).ok
    _rebuild_and_kill(raw, store)
    st = SliceStore(str(store))
    assert st.size == (32, 32) and st.cases == ["0", "1", "2", "3"]
    assert st.verify() == {}
    assert {st.volume(c)[0].shape[1:] for c in st.cases} == {(32, 32)}
    rep = ingest(raw, store, IngestConfig(size=(48, 48), workers=2), progress=False)
    assert rep.ok and sorted(rep.written) == ["0", "1", "2", "3"]
    st = SliceStore(str(store))
    assert st.size == (48, 48) and st.verify() == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "s.zarr"]  # no sibling left behind


def test_geometry_change_needs_prune_for_vanished_cases(tmp_path, phantom_dir):
    raw = tmp_path / "raw"
    for n in ("0", "1", "2"):
        copy_case(phantom_dir, raw, n)
    store = tmp_path / "s.zarr"
    assert ingest(raw, store, IngestConfig(size=(32, 32), workers=1), progress=False).ok
    for f in raw.glob("*-2.nii.gz"):
        f.unlink()
    from liverseg.core.errors import InputError

    with pytest.raises(InputError, match="--prune"):
        ingest(raw, store, IngestConfig(size=(40, 40), workers=1), progress=False)
    assert SliceStore(str(store)).size == (32, 32) and SliceStore(str(store)).cases == ["0", "1", "2"]
    rep = ingest(raw, store, IngestConfig(size=(40, 40), workers=1), progress=False, prune=True)
    assert rep.ok and rep.pruned == ["2"] and SliceStore(str(store)).cases == ["0", "1"]


def test_verify_checks_arrays_against_root_and_splits(tmp_path, phantom_dir):
    """A case of another size, or a split list that disagrees with the cases, is a problem for --verify."""

    raw = tmp_path / "raw"
    for n in ("0", "1", "2"):
        copy_case(phantom_dir, raw, n)
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    cfg = IngestConfig(size=(32, 32), workers=1)
    assert ingest(raw, a, cfg, progress=False).ok
    assert ingest(raw, b, IngestConfig(size=(40, 40), workers=1), progress=False).ok
    shutil.rmtree(a / "cases" / "1")
    shutil.copytree(b / "cases" / "1", a / "cases" / "1")  # what a killed in-place re-ingest left
    problems = SliceStore(str(a)).verify()
    assert list(problems) == ["1"] and "size" in problems["1"], problems
    res = _cli("ingest", "--raw", str(raw), "--store", str(a), "--verify")
    assert res.returncode == 1 and "case 1:" in res.stderr
    from liverseg.core.errors import StoreError

    with pytest.raises(StoreError, match="case 1"):  # the reader never serves the wrong size
        SliceStore(str(a)).volume("1")
    meta = json.loads((b / "zarr.json").read_text())
    meta["attributes"]["splits"]["train"] = meta["attributes"]["splits"]["train"][1:]
    (b / "zarr.json").write_text(json.dumps(meta))
    assert "store" in SliceStore(str(b)).verify()


@pytest.mark.slow
def test_workers_die_with_a_killed_parent(tmp_path):
    """SIGKILL of the ingest process alone (not its group): no worker keeps running or writing."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from liverseg.data.phantoms import write_phantoms

    raw = tmp_path / "raw"
    write_phantoms(raw, 6, seed=5, shape=(160, 160, 96))
    store = tmp_path / "s.zarr"
    cmd = [sys.executable, "-m", "liverseg.cli", "ingest", "--raw", str(raw), "--store", str(store)]
    proc = subprocess.Popen([*cmd, "--set", "workers=2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = lambda: subprocess.run(  # noqa: E731
        ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
    ).stdout.split()
    deadline = time.time() + 60
    while time.time() < deadline and not list(store.glob("cases/.tmp-*")):
        time.sleep(0.05)  # the workers are writing their first cases
    workers = [int(p) for p in children()]
    assert workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    alive = workers
    deadline = time.time() + 20
    while alive and time.time() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if os.path.exists(f"/proc/{p}") and "Z" not in _state(p)]
    for p in alive:  # never leave them running, but fail
        os.kill(p, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their parent"
    written = sorted(p.name for p in store.glob("cases/[0-9]*"))
    time.sleep(1)
    assert sorted(p.name for p in store.glob("cases/[0-9]*")) == written


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _lits(phantom_dir: Path, raw: Path) -> dict[str, bytes]:
    """A 2-case LiTS folder; returns its snapshot {relative path: bytes}."""
    for n in ("0", "1"):
        copy_case(phantom_dir, raw, n)
    return _files(raw)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["is-raw", "holds-raw", "inside-raw", "raw-via-dotdot", "raw-via-symlink"])
def test_a_store_overlapping_the_raw_folder_is_refused(tmp_path, phantom_dir, where):
    """A store in the raw folder (or above it) once had a size change delete every LiTS file, exit 0."""
    top = tmp_path / "top"
    raw = top / "lits"
    before = _lits(phantom_dir, raw)
    (raw / "sub").mkdir()
    (tmp_path / "link").symlink_to(raw)
    store = {
        "is-raw": raw,
        "holds-raw": top,
        "inside-raw": raw / "s.zarr",
        "raw-via-dotdot": raw / "sub" / "..",
        "raw-via-symlink": tmp_path / "link",
    }[where]
    for size in ((32, 32), (16, 16)):  # the second was the size change that deleted the raw folder
        with pytest.raises(StoreError, match="raw folder") as e:
            ingest(raw, store, IngestConfig(size=size, workers=1), progress=False)
        assert str(store) in str(e.value) and str(raw) in str(e.value) and "\n" not in str(e.value)
    assert _files(top) == {f"lits/{k}": v for k, v in before.items()}  # nothing written, nothing lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "top"]
    if where == "is-raw":  # the CLI: exit 1, one line naming both paths
        res = _cli("ingest", "--raw", str(raw), "--store", str(store), "--set", "size=[16,16]", "--set", "workers=1")
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert res.returncode == 1 and len(errors) == 1 and str(raw) in errors[0], res.stderr
        assert "Traceback" not in res.stderr and _files(raw) == before


def test_only_the_stores_own_files_are_ever_deleted(tmp_path, phantom_dir):
    """A rebuild swaps and deletes the store folder whole: a folder holding anything else is refused."""
    raw = tmp_path / "raw"
    _lits(phantom_dir, raw)
    cfg16, cfg32 = IngestConfig(size=(16, 16), workers=1), IngestConfig(size=(32, 32), workers=1)
    mine = tmp_path / "mine"  # an existing folder that is not a store
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(StoreError, match="notes.txt"):
        ingest(raw, mine, cfg16, progress=False)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    store = tmp_path / "s.zarr"
    assert ingest(raw, store, cfg16, progress=False).ok
    (store / "cases" / "mine.txt").write_text("keep")  # added by hand: a rebuild would delete it
    with pytest.raises(StoreError, match="cases/mine.txt"):
        ingest(raw, store, cfg32, progress=False)
    assert (store / "cases" / "mine.txt").read_text() == "keep" and SliceStore(str(store)).size == (16, 16)
    (store / "cases" / "mine.txt").unlink()
    beside = tmp_path / ".s.zarr.old-mine"  # a sibling named like a swap leftover, holding a user file
    beside.mkdir()
    (beside / "keep.txt").write_text("keep")
    assert ingest(raw, store, cfg32, progress=False).ok and SliceStore(str(store)).size == (32, 32)
    assert (beside / "keep.txt").read_text() == "keep"
    meta = json.loads((store / "zarr.json").read_text())  # a case id that is a path would prune outside
    meta["attributes"]["case_slices"]["../victim"] = 1
    (store / "zarr.json").write_text(json.dumps(meta))
    (tmp_path / "victim").mkdir()
    with pytest.raises(StoreError, match="not a LiTS id"):
        ingest(raw, store, cfg32, progress=False, prune=True)
    assert (tmp_path / "victim").is_dir()


def test_store_dot_gets_a_reason(tmp_path, phantom_dir):
    """`--store .` in a rebuild ended in `ValueError: PosixPath('.') has an empty name`."""
    raw = tmp_path / "raw"
    _lits(phantom_dir, raw)
    store = tmp_path / "s.zarr"
    assert ingest(raw, store, IngestConfig(size=(16, 16), workers=1), progress=False).ok
    before = _files(store)
    res = _cli("ingest", "--raw", str(raw), "--store", ".", "--set", "size=[32,32]", cwd=store)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 1 and len(errors) == 1 and "current folder" in errors[0], res.stderr
    assert "ValueError" not in res.stderr and _files(store) == before


def test_metrics_out_never_replaces_a_raw_file(tmp_path, phantom_dir):
    """`--out` is written over whatever it names: a raw volume, the store, a folder are refused first."""
    from liverseg.data.store_folder import check_metrics_out

    raw, store = tmp_path / "raw", tmp_path / "s.zarr"
    before = _lits(phantom_dir, raw)
    for out, says in ((raw / "volume-0.nii.gz", "raw folder"), (store, "store"), (store / "m.json", "store")):
        with pytest.raises(StoreError, match=says):
            check_metrics_out(out, raw, store)
    with pytest.raises(StoreError, match="is a folder"):
        check_metrics_out(tmp_path, raw, store)
    res = _cli("ingest", "--raw", str(raw), "--store", str(store), "--out", str(raw / "volume-0.nii.gz"))
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 1 and len(errors) == 1 and "raw folder" in errors[0], res.stderr
    assert _files(raw) == before and not store.exists()


def test_a_second_ingest_of_a_store_is_refused_while_one_runs(tmp_path):
    """Two ingests of one store: the second's clean-up of interrupted runs would delete the first one's
    half-built copy (a size change), and their swaps would interleave. One runs, the other is refused."""
    import subprocess
    import sys
    import time

    from liverseg.data.phantoms import write_phantoms

    raw, store = tmp_path / "raw", tmp_path / "s.zarr"
    write_phantoms(raw, 4, seed=11, shape=(96, 96, 48))
    assert ingest(raw, store, IngestConfig(size=(32, 32), workers=2), progress=False).ok
    cmd = [sys.executable, "-m", "liverseg.cli", "ingest", "--raw", str(raw), "--store", str(store)]
    proc = subprocess.Popen([*cmd, "--set", "size=[48,48]", "--set", "workers=1"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(tmp_path.glob(".s.zarr.new-*")):
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read()  # caught it mid-rebuild
    with pytest.raises(StoreError, match="another ingest is writing"):
        ingest(raw, store, IngestConfig(size=(48, 48), workers=1), progress=False)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    st = SliceStore(str(store))
    assert st.size == (48, 48) and st.cases == ["0", "1", "2", "3"] and st.verify() == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "s.zarr"]  # no lock file left
