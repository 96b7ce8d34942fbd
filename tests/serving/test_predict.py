"""Predict's plan (checked before any model load) and a folder run that survives any failing file."""

import gzip
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from liverseg.core.errors import PredictError
from liverseg.model.artifact import load_local, save_local
from liverseg.serving.predict import plan, predict_jobs
from support.models import constant_state, spec

NO_MODEL = "models:/no-such-model@champion"  # any load would fail: errors below come from the plan


def _predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "liverseg.cli", "predict", *args], capture_output=True, text=True, timeout=300
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_lits_folder_onto_itself_overwrites_nothing(tmp_path, phantom_dir):
    """`predict DIR DIR` on a LiTS folder once replaced the ground truth with predictions."""
    lits = tmp_path / "lits"
    shutil.copytree(phantom_dir, lits)
    before = _snapshot(lits)
    for extra in ([], ["--overwrite"]):  # --overwrite once replaced it too: ground truth is an input
        res = _predict(str(lits), str(lits), "--model", NO_MODEL, *extra)
        assert res.returncode == 1 and "is LiTS ground truth (of volume-" in res.stderr, res.stderr
        assert "segmentation-" in res.stderr and "--overwrite" not in res.stderr
        assert res.stderr.count("\n") == 1 and "cannot load model" not in res.stderr
    assert _snapshot(lits) == before


@pytest.mark.parametrize(
    "case",
    ["same-name", "input-as-output", "existing-file", "missing-input", "output-under-a-file", "file-into-folder"],
)
def test_plan_refuses_before_the_model_loads(tmp_path, phantom_dir, case):
    src = tmp_path / "in"
    src.mkdir()
    vol = phantom_dir / "volume-0.nii.gz"
    shutil.copy(vol, src / "ct.nii.gz")
    out = tmp_path / "out"
    args, expect = {
        "same-name": ((src, out), "two outputs with one name"),
        "input-as-output": ((src / "ct.nii.gz", src / "ct.nii.gz"), "is an input"),
        "existing-file": ((src / "ct.nii.gz", src / "ct.nii.gz.txt"), "exists; give --overwrite"),
        "missing-input": ((tmp_path / "nope.nii.gz", out / "m.nii.gz"), "no such file"),
        "output-under-a-file": ((src / "ct.nii.gz", src / "ct.nii.gz" / "m.nii.gz"), "is a file"),
        "file-into-folder": ((src / "ct.nii.gz", src), "is a folder"),
    }[case]
    if case == "same-name":
        nib.save(nib.load(str(vol)), str(src / "ct.nii"))  # ct.nii and ct.nii.gz -> ct.nii.gz
    if case == "existing-file":
        (src / "ct.nii.gz.txt").write_text("mine")
    with pytest.raises(PredictError, match=expect):
        plan(*args)
    res = _predict(str(args[0]), str(args[1]), "--model", NO_MODEL)
    assert res.returncode == 1 and expect in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not out.exists()
    if case == "existing-file":
        assert (src / "ct.nii.gz.txt").read_text() == "mine"
        assert [j.dst for j in plan(*args, overwrite=True)] == [src / "ct.nii.gz.txt"]


def _odd_voxels(path: Path, dtype) -> None:
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), dtype=dtype), np.eye(4)), str(path))


def test_folder_run_continues_past_any_failure(tmp_path, phantom_dir):
    """RGB voxels once aborted a folder run on its first file; complex voxels were cast to real."""
    d = tmp_path / "m"
    save_local(d, constant_state(liver=True), spec())
    lm = load_local(d, "cpu")
    src = tmp_path / "in"
    src.mkdir()
    for n in ("0", "1"):
        shutil.copy(phantom_dir / f"volume-{n}.nii.gz", src)
    _odd_voxels(src / "volume-5.nii", [("R", "u1"), ("G", "u1"), ("B", "u1")])
    _odd_voxels(src / "volume-6.nii", np.complex64)
    (src / "volume-7.nii.gz").write_bytes(b"broken")
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(phantom_dir / "volume-2.nii.gz", src / "volume-8.nii.gz")
    # 4 kB declaring 4000 slices: each would be resized to the model size before any check
    nib.save(nib.Nifti1Image(np.zeros((1, 1, 4000), np.uint8), np.eye(4)), str(src / "volume-9.nii"))
    # 16000 x 16000 x 1 voxels declared by a header of 352 bytes: refused before anything is decoded
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((16000, 16000, 1))
    hdr.set_data_dtype(np.uint8)
    (src / "volume-4.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + bytes(4)))
    raw = gzip.decompress((phantom_dir / "volume-3.nii.gz").read_bytes())  # bgzip-like: two gzip members
    (src / "volume-3.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    jobs = plan(src, out, overwrite=True)
    (out / "segmentation-8.nii.gz").mkdir()  # the writer fails on this one (a folder appeared after planning)
    report = predict_jobs(lm, jobs, overwrite=True)
    written = ["segmentation-0.nii.gz", "segmentation-1.nii.gz", "segmentation-3.nii.gz"]
    assert sorted(p.name for p in report.written) == written
    assert set(report.failed) == {str(src / f"volume-{n}.nii{'.gz' if n in '478' else ''}") for n in "456789"}
    msgs = report.failed
    assert msgs[str(src / "volume-9.nii")] == "volume-9.nii: 4000 axial slices exceed the limit of 2048 (max_slices)"
    assert msgs[str(src / "volume-4.nii.gz")] == (
        "volume-4.nii.gz: in-plane size 16000 x 16000 exceeds the limit of 2048 per axis (max_inplane)"
    )
    assert "voxel type RGB is not a real scalar" in msgs[str(src / "volume-5.nii")]
    assert "voxel type complex64 is not a real scalar" in msgs[str(src / "volume-6.nii")]
    assert all("\n" not in m for m in msgs.values())
    assert msgs[str(src / "volume-8.nii.gz")] == f"{out / 'segmentation-8.nii.gz'}: cannot write (Is a directory)"
    assert sorted(p.name for p in out.iterdir()) == [*written, "segmentation-8.nii.gz"]


@pytest.mark.parametrize(
    "case",
    [
        "lits-pair",
        "lits-pair-nii",
        "folder-into-itself",
        "into-another-lits",
        "overlay-is-a-folder",
        "mask-is-a-folder",
    ],
)
def test_ground_truth_and_folders_are_never_outputs(tmp_path, phantom_dir, case):
    """Even with --overwrite: a volume's LiTS segmentation beside it is ground truth, and a folder where an
    output goes is refused at planning (an overlay folder once failed after the mask was written)."""
    lits = tmp_path / "lits"
    shutil.copytree(phantom_dir, lits)
    vol, out = lits / "volume-0.nii.gz", tmp_path / "out"
    (tmp_path / "ovdir").mkdir()
    (out / "segmentation-1.nii.gz").mkdir(parents=True)
    shutil.copy(vol, out / "volume-1.nii.gz")  # a CT-only folder whose masks would land on lits/'s truth
    if case == "lits-pair-nii":  # the truth is segmentation-0.nii: a .nii.gz beside it would double the pair
        nib.save(nib.load(str(lits / "segmentation-0.nii.gz")), str(lits / "segmentation-0.nii"))
        (lits / "segmentation-0.nii.gz").unlink()
    args, overlay, expect = {
        "lits-pair": ([vol, lits / "segmentation-0.nii.gz"], None, "is LiTS ground truth (of volume-0.nii.gz"),
        "lits-pair-nii": ([vol, lits / "segmentation-0.nii.gz"], None, "is LiTS ground truth (of volume-0.nii.gz"),
        "folder-into-itself": ([lits, lits], None, "is LiTS ground truth (of volume-0.nii.gz"),
        "into-another-lits": ([out, lits], None, "is LiTS ground truth (of volume-1.nii.gz"),
        "overlay-is-a-folder": ([vol, out / "m1.nii.gz"], tmp_path / "ovdir", "ovdir: exists and is not a file"),
        "mask-is-a-folder": ([lits, out], None, "segmentation-1.nii.gz: exists and is not a file"),
    }[case]
    before = _snapshot(lits)
    with pytest.raises(PredictError, match=re.escape(expect)):
        plan(*args, overwrite=True, overlay=overlay)
    cli = [str(a) for a in args] + (["--overlay", str(overlay)] if overlay else [])
    res = _predict(*cli, "--model", NO_MODEL, "--overwrite")
    assert res.returncode == 1 and expect in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert "--overwrite" not in res.stderr and ".tmp" not in res.stderr
    assert _snapshot(lits) == before and sorted(p.name for p in out.iterdir()) == [
        "segmentation-1.nii.gz",
        "volume-1.nii.gz",
    ]


def test_bad_folder_entries_are_failures_among_the_others(tmp_path, phantom_dir):
    """Before: a symlink loop in the input folder aborted the whole run with a traceback (RuntimeError
    from Path.resolve), and entries with NIfTI names that are no files were skipped in silence. After:
    each is one FAILED line, the good volumes are written, exit 1; an output that is a loop is replaced."""
    import os

    d = tmp_path / "m"
    save_local(d, constant_state(liver=True), spec())
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    for n in ("0", "1"):
        shutil.copy(phantom_dir / f"volume-{n}.nii.gz", src)
    (src / "volume-2.nii.gz").symlink_to("volume-2.nii.gz")  # a loop
    (src / "volume-3.nii.gz").symlink_to(tmp_path / "gone.nii.gz")  # dangling
    (src / "volume-4.nii.gz").mkdir()  # a folder with a NIfTI name
    os.mkfifo(src / "volume-5.nii")  # reading it would block for ever
    (out / "segmentation-1.nii.gz").symlink_to("segmentation-1.nii.gz")  # an output that is a loop
    res = _predict(str(src), str(out), "--model", str(d), "--device", "cpu")
    failed = sorted(line for line in res.stderr.splitlines() if line.startswith("FAILED "))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert failed == [
        f"FAILED {src / 'volume-2.nii.gz'}: Too many levels of symbolic links",
        f"FAILED {src / 'volume-3.nii.gz'}: No such file or directory",
        f"FAILED {src / 'volume-4.nii.gz'}: is a folder, not a NIfTI file",
        f"FAILED {src / 'volume-5.nii'}: not a regular file (a FIFO, socket or device)",
    ]
    assert f"predict: 2 masks written to {out}, 4 failed" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == ["segmentation-0.nii.gz", "segmentation-1.nii.gz"]
    assert not (out / "segmentation-1.nii.gz").is_symlink() and nib.load(str(out / "segmentation-1.nii.gz")).shape


def test_predict_cli_folder_mode(mlflow_uri, phantom_dir, tmp_path):
    import shutil
    import subprocess
    import sys

    from support.models import log_model_run

    _, uri = log_model_run(constant_state(liver=True))
    src = tmp_path / "in"
    src.mkdir()
    for n in ("0", "1"):
        shutil.copy(phantom_dir / f"volume-{n}.nii.gz", src)
    (src / "volume-9.nii.gz").write_bytes(b"broken")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "liverseg.cli",
            "predict",
            str(src),
            str(tmp_path / "out"),
            "--model",
            uri,
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and "2 masks written" in res.stdout and "FAILED volume-9.nii.gz" in res.stderr
    for n in ("0", "1"):
        m, v = nib.load(str(tmp_path / "out" / f"segmentation-{n}.nii.gz")), nib.load(str(src / f"volume-{n}.nii.gz"))
        assert m.shape == v.shape and np.array_equal(m.affine, v.affine)


def test_predict_needs_no_training_stack(tmp_path, real_ct):
    """Serving images carry torch and nibabel; `liverseg predict` with a model folder must not pull in
    zarr, Ray, MLflow, nor liverseg's evaluation, registry or training."""
    import subprocess
    import sys

    save_local(tmp_path / "m", constant_state(liver=True), spec())
    args = ["predict", str(real_ct / "volume-0.nii.gz"), str(tmp_path / "mask.nii.gz"), "--model", str(tmp_path / "m")]
    heavy = (
        "zarr",
        "ray",
        "mlflow",
        "liverseg.registry.evaluate",
        "liverseg.registry.promote",
        "liverseg.training.train",
    )
    code = (
        "import sys; from liverseg.cli import app\n"
        f"app({args + ['--device', 'cpu']!r}, standalone_mode=False)\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]" and (tmp_path / "mask.nii.gz").exists()
