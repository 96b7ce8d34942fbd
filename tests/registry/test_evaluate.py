import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from liverseg.core.errors import InputError
from liverseg.data.store import SliceStore
from liverseg.registry.evaluate import evaluate, log_evaluation, score_files, worst_overlays, write_outputs
from liverseg.tracking.models import load_model
from support.models import constant_state, log_model_run


def _nii(path, arr, affine=None):
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return path


def test_score_files_known_values(tmp_path):
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[5:15, 5:15, 5:15] = 1
    pred = np.roll(ref, 2, axis=0) * 2  # tumour label counts as liver
    aff = np.diag([1.5, 1.0, 1.0, 1.0])
    s = score_files(_nii(tmp_path / "p.nii.gz", pred, aff), _nii(tmp_path / "r.nii.gz", ref, aff))
    assert s["dice"] == pytest.approx(0.8) and s["iou"] == pytest.approx(8 / 12)
    assert s["msd_mm"] == pytest.approx(3.0)  # 2 voxels of 1.5 mm
    assert set(s) == {"dice", "iou", "voe", "rvd", "assd_mm", "msd_mm", "hd95_mm"}


def test_score_grid_mismatch_is_clear(tmp_path):
    a = _nii(tmp_path / "a.nii", np.zeros((4, 4, 4), np.uint8))
    b = _nii(tmp_path / "b.nii", np.zeros((4, 4, 5), np.uint8))
    c = _nii(tmp_path / "c.nii", np.zeros((4, 4, 4), np.uint8), np.diag([2.0, 1, 1, 1]))
    with pytest.raises(InputError, match="shape"):
        score_files(a, b)
    with pytest.raises(InputError, match="affine differs"):
        score_files(a, c)


def test_score_cli_json(tmp_path, real_ct):
    seg = real_ct / "segmentation-0.nii.gz"
    res = subprocess.run(
        [sys.executable, "-m", "liverseg.cli", "score", "--pred", str(seg), "--ref", str(seg), "--json"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert s["dice"] == 1.0 and s["hd95_mm"] == 0.0
    empty = _nii(tmp_path / "e.nii.gz", np.zeros((122, 101, 30), np.uint8), nib.load(str(seg)).affine)
    s2 = json.loads(
        subprocess.run(
            [sys.executable, "-m", "liverseg.cli", "score", "--pred", str(empty), "--ref", str(seg), "--json"],
            capture_output=True,
            text=True,
        ).stdout
    )
    assert s2["dice"] == 0.0 and s2["assd_mm"] is None  # undefined distance -> null


def test_evaluate_on_store_and_original_grid(mlflow_uri, store_path, phantom_dir, tmp_path):
    _, uri = log_model_run(constant_state(liver=True), store_path=store_path)
    st = SliceStore(store_path)
    ev = evaluate(uri, store_path, "test")
    assert [c["case"] for c in ev.cases] == st.cases_in("test") and ev.resolution == "store"
    # all-liver prediction: Dice = 2|L| / (|L| + N) per case, recall 1
    for c in ev.cases:
        _, msk = st.volume(c["case"])
        liver = (msk >= 1).sum()
        assert c["dice"] == pytest.approx(2 * liver / (liver + msk.size), rel=1e-6)
    assert ev.summary["pixel_recall"] == 1.0
    raw = evaluate(uri, store_path, "test", raw=phantom_dir)
    assert raw.resolution == "original" and raw.summary["resolution"] == "original"
    write_outputs(ev, tmp_path / "m.json", tmp_path / "c.csv")
    summary = json.loads((tmp_path / "m.json").read_text())
    assert set(summary["dice"]) == {"mean", "median", "std", "min", "max", "undefined"}
    assert (tmp_path / "c.csv").read_text().splitlines()[0] == "case,dice,iou,voe,rvd,assd_mm,msd_mm,hd95_mm,slices"
    client = MlflowClient(mlflow_uri)
    run = client.get_run(log_evaluation(ev, tmp_path / "m.json", tmp_path / "c.csv"))
    # the store-grid figure is labelled: `test_dice` is only ever the LiTS one (original grid)
    assert "test_dice" not in run.data.metrics
    assert run.data.tags["model_uri"] == uri
    assert run.data.metrics["test_dice_store_grid"] == pytest.approx(summary["dice"]["mean"])
    images = worst_overlays(raw, load_model(uri), phantom_dir, tmp_path / "worst", k=1)
    assert len(images) == 1 and images[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lits = client.get_run(log_evaluation(raw, tmp_path / "m.json", None, images=images))
    assert lits.data.metrics["test_dice"] == pytest.approx(raw.summary["dice"]["mean"])
    table = json.loads(Path(client.download_artifacts(lits.info.run_id, "cases.json", str(tmp_path))).read_text())
    assert [r[0] for r in table["data"]] == st.cases_in("test") and table["columns"][:2] == ["case", "dice"]
    assert [a.path for a in client.list_artifacts(lits.info.run_id, "worst_cases")] == [f"worst_cases/{images[0].name}"]
    (test_input,) = run.inputs.dataset_inputs
    assert test_input.dataset.name == "slices.zarr/test" and json.loads(test_input.dataset.profile)["cases"] == len(
        st.cases_in("test")
    )
    assert {t.key: t.value for t in test_input.tags}["mlflow.data.context"] == "evaluation"


def test_empty_prediction_gives_undefined_distances(mlflow_uri, store_path):
    _, uri = log_model_run(constant_state(liver=False))
    ev = evaluate(uri, store_path, "val", lcc=False)
    assert all(c["dice"] == 0.0 and c["assd_mm"] is None for c in ev.cases)
    assert ev.summary["assd_mm"]["undefined"] == len(ev.cases)


def _hostile_masks(tmp_path) -> dict[str, tuple[bytes | np.ndarray, str]]:
    """name -> (file bytes or voxels, what the one-line refusal says)."""
    from support.nifti import nifti2_declaring

    ok = np.zeros((8, 8, 8), np.uint8)
    noisy = ok.astype(np.float32)
    return {
        "header-32767-cubed.nii": (nifti2_declaring((32767,) * 3, nifti1=True), "declared shape (32767, 32767, 32767)"),
        "complex.nii": (ok.astype(np.complex64), "is not a real scalar"),
        "nan.nii": (np.where(ok == 0, np.nan, noisy).astype(np.float32), "non-finite voxels"),
        "inf.nii": (np.full((8, 8, 8), np.inf, np.float32), "non-finite voxels"),
        "probabilities.nii": (np.full((8, 8, 8), 0.3, np.float32), "512 voxels are not whole labels"),
        "negative.nii": (np.full((8, 8, 8), -1, np.int16), "negative labels"),
        "four-d.nii": (np.zeros((8, 8, 8, 2), np.uint8), "4-D image"),
        "not-nifti.nii": (b"hello, not a NIfTI file" * 20, "not a NIfTI file"),
        "empty.nii": (b"", "empty file"),
    }


def test_score_checks_both_files_like_ingest(tmp_path):
    """Before: score read the voxels itself: MemoryError on a header declaring 32767^3, complex/NaN/inf
    predictions scored with exit 0. After: ingest's reader checks, each file refused in one line."""
    ref = _nii(tmp_path / "ref.nii", np.zeros((8, 8, 8), np.uint8))
    for name, (content, says) in _hostile_masks(tmp_path).items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            _nii(path, content)
        for pred, reference in ((path, ref), (ref, path)):  # either side
            with pytest.raises(InputError, match=f"{re.escape(name)}: .*{re.escape(says)}"):
                score_files(pred, reference)
    res = subprocess.run(
        [sys.executable, "-m", "liverseg.cli", "score", "--pred", str(tmp_path / "header-32767-cubed.nii")]
        + ["--ref", str(ref)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "declared shape" in res.stderr, res.stderr


def test_score_refuses_files_past_the_readers_limits(tmp_path):
    """The limits every file reader shares (core/limits.py), checked on the header before voxel arrays
    are made: a header declaring 32767^3 voxels once made `score` raise MemoryError."""
    import gzip
    import io

    import nibabel as nib

    from liverseg.core.errors import TooLarge

    ref = _nii(tmp_path / "ref.nii", np.zeros((64, 64, 64), np.uint8))
    raw = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).to_bytes()
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    hdr.set_data_shape((32767, 32767, 32767))
    huge = tmp_path / "huge.nii.gz"
    huge.write_bytes(gzip.compress(hdr.binaryblock + raw[348:352]))
    with pytest.raises(TooLarge, match=r"huge.nii.gz: .*32767 axial slices exceed the limit of 2048"):
        score_files(huge, ref)
    bomb = tmp_path / "bomb.nii.gz"  # 64^3 voxels declared, 3 MB more behind them
    bomb.write_bytes(gzip.compress(ref.read_bytes() + bytes(3_000_000)))
    with pytest.raises(TooLarge, match=r"bomb.nii.gz: decompresses to more than \d+ bytes \(its header declares"):
        score_files(ref, bomb)
