"""Evaluate: LiTS-style per-volume scores of an MLflow model on a split, and `score` for any two masks.

Per case: Dice, IoU, VOE, RVD, ASSD, MSD (Hausdorff), HD95 in mm, after 3-D largest-component
clean-up; plus global Dice over all voxels and the paper's pixel accuracy, precision and recall.
With the raw NIfTI folder, masks are scored on each volume's original grid (the LiTS way); otherwise
at store resolution, with the stored voxel spacing.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.affines import voxel_sizes

from liverseg.core.errors import InputError, RegistryError
from liverseg.core.files import atomic_write_bytes, atomic_write_json
from liverseg.data.lits import AFFINE_TOL, CasePaths, discover, read_case, read_labels
from liverseg.data.store import SliceStore
from liverseg.model.artifact import LoadedModel
from liverseg.model.inference import segment_canonical
from liverseg.model.metrics import counts, overlap_scores, score_volume
from liverseg.model.plots import mask_overlay_png
from liverseg.tracking import tags
from liverseg.tracking.models import load_model, resolve_version
from liverseg.tracking.provenance import store_datasets
from liverseg.tracking.runs import author, experiment_id
from liverseg.tracking.runs import client as mlflow_client

CASE_METRICS = ("dice", "iou", "voe", "rvd", "assd_mm", "msd_mm", "hd95_mm")


@dataclass
class Evaluation:
    model_uri: str
    split: str
    resolution: str  # "original" (raw NIfTI grid) or "store"
    store_path: str = ""
    cases: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None


def finite(v: Any) -> Any:
    """JSON has no inf/NaN: such values become null (meaning: undefined, e.g. an empty mask)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def summarise(cases: list[dict[str, Any]], totals: np.ndarray) -> dict[str, Any]:
    """mean/median/std/min/max per metric (over finite values) + global voxel scores."""
    out: dict[str, Any] = {"n_cases": len(cases)}
    for m in CASE_METRICS:
        vals = np.array([c[m] for c in cases if c[m] is not None and math.isfinite(c[m])], dtype=float)
        out[m] = {
            "mean": float(vals.mean()) if len(vals) else None,
            "median": float(np.median(vals)) if len(vals) else None,
            "std": float(vals.std()) if len(vals) else None,
            "min": float(vals.min()) if len(vals) else None,
            "max": float(vals.max()) if len(vals) else None,
            "undefined": len(cases) - len(vals),
        }
    g = overlap_scores(*totals.tolist())
    out["global_dice"] = g["dice"]
    out["pixel_accuracy"], out["pixel_precision"], out["pixel_recall"] = g["accuracy"], g["precision"], g["recall"]
    return out


def evaluate(
    model_uri: str,
    store_path: str,
    split: str = "test",
    raw: str | Path | None = None,
    lcc: bool = True,
    device: str = "auto",
    lm: LoadedModel | None = None,
) -> Evaluation:
    """Score a model on every case of a split (see module docstring)."""

    store = SliceStore(store_path)
    lm = lm or load_model(model_uri, device)
    raw_cases: dict[str, CasePaths] = {c.case_id: c for c in discover(raw)[0]} if raw else {}
    ev = Evaluation(model_uri, split, "original" if raw else "store", store_path)
    totals = np.zeros(4, dtype=np.float64)
    for case in store.cases_in(split):
        image, ref, spacing = case_arrays(store, case, raw, raw_cases)
        pred = segment_canonical(lm, image, lcc=lcc)
        totals += counts(pred, ref)
        scores = score_volume(pred, ref, spacing)
        ev.cases.append({"case": case, **{m: finite(scores[m]) for m in CASE_METRICS}, "slices": int(image.shape[0])})
    ev.summary = {
        **summarise(ev.cases, totals),
        "resolution": ev.resolution,
        "split": split,
        "lcc": lcc,
        "model_uri": model_uri,
    }
    return ev


def case_arrays(store: Any, case: str, raw: str | Path | None, raw_cases: dict[str, Any]):
    """(image (Z, Y, X) HU, reference mask (Z, Y, X), spacing (z, y, x) mm) of a case: from the raw NIfTI
    (original grid, canonical RAS+) when `raw` is given, else from the store."""

    if raw:
        if case not in raw_cases:
            raise InputError(f"{raw}: no volume-{case}.nii[.gz] for store case {case}")
        vol = read_case(raw_cases[case])
        return vol.image, vol.mask, tuple(reversed(vol.spacing))  # (z, y, x) to match the (Z, Y, X) arrays
    image, ref = store.volume(case)
    return image, ref, tuple(store.case_attrs(case)["stored_spacing_mm_zyx"])


def worst_overlays(ev: Evaluation, lm: Any, raw: str | Path | None, out_dir: str | Path, k: int = 3) -> list[Path]:
    """PNG overlays (prediction red, truth green; axial and coronal) of the k cases with the lowest Dice."""

    store = SliceStore(ev.store_path)
    raw_cases = {c.case_id: c for c in discover(raw)[0]} if raw else {}
    worst = sorted(ev.cases, key=lambda c: -1.0 if c["dice"] is None else c["dice"])[:k]
    paths = []
    for rank, c in enumerate(worst, 1):
        image, ref, spacing = case_arrays(store, c["case"], raw, raw_cases)
        pred = segment_canonical(lm, image, lcc=bool(ev.summary.get("lcc", True)))
        dice = "undefined" if c["dice"] is None else f"{c['dice']:.4f}"
        out = Path(out_dir) / f"worst-{rank}-case-{c['case']}.png"
        title = f"case {c['case']}: Dice {dice} ({ev.resolution} grid)"
        window = tuple(lm.spec.window)
        mask_overlay_png(image, pred, tuple(reversed(spacing)), window, out, truth=ref, title=title)
        paths.append(out)
    return paths


def write_outputs(ev: Evaluation, out_json: str | Path, out_csv: str | Path | None = None) -> None:
    atomic_write_json(out_json, ev.summary)
    if out_csv:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["case", *CASE_METRICS, "slices"], lineterminator="\n")
        w.writeheader()
        w.writerows(ev.cases)
        atomic_write_bytes(out_csv, buf.getvalue().encode())


def log_evaluation(
    ev: Evaluation,
    out_json: str | Path,
    out_csv: str | Path | None,
    experiment: str = "liverseg",
    images: list[Path] | None = None,
) -> str:
    """An MLflow evaluation run linked to the model (URI, training run, registry version): summary metrics,
    the per-case scores as an MLflow table (`cases.json`, shown in the run's artifacts and the Evaluations
    view), and `images` (the worst cases' overlays) under `worst_cases/`."""

    client = mlflow_client()
    run_tags = {
        tags.KIND: "evaluation",
        tags.MLFLOW_USER: author(),
        tags.MODEL_URI: ev.model_uri,
        tags.SPLIT: ev.split,
        tags.RESOLUTION: ev.resolution,
    }
    run_tags.update(model_link_tags(client, ev.model_uri))
    run = client.create_run(experiment_id(client, experiment), run_name=f"eval-{ev.split}", tags=run_tags)
    rid = run.info.run_id
    if ev.store_path:
        from liverseg.data.store import SliceStore

        client.log_inputs(
            rid, datasets=store_datasets(SliceStore(ev.store_path), ev.store_path, {ev.split: "evaluation"})
        )
    label = "" if ev.resolution == "original" else "_store_grid"  # one test Dice: LiTS's, on the original grid
    for m in CASE_METRICS:
        if ev.summary[m]["mean"] is not None:
            client.log_metric(rid, f"{ev.split}_{m}{label}", ev.summary[m]["mean"])
    for k in ("global_dice", "pixel_accuracy", "pixel_precision", "pixel_recall"):
        client.log_metric(rid, f"{ev.split}_{k}{label}", ev.summary[k])
    client.log_artifact(rid, str(out_json))
    if out_csv:
        client.log_artifact(rid, str(out_csv))
    client.log_table(rid, {k: [c[k] for c in ev.cases] for k in ("case", *CASE_METRICS, "slices")}, "cases.json")
    for img in images or []:
        client.log_artifact(rid, str(img), "worst_cases")
    client.set_terminated(rid, "FINISHED")
    ev.mlflow_run_id = rid
    return rid


def model_link_tags(client, uri: str) -> dict[str, str]:
    """Registry name/version and training run of a registry URI (empty for other URIs)."""
    try:
        mv = resolve_version(client, uri)
    except RegistryError:  # runs:/ or a logged-model id: not a registry version
        return {}
    run_id = (mv.tags or {}).get(tags.TRAINING_RUN_ID) or mv.run_id  # served copies: the training run, not the copy's
    return {tags.MODEL_NAME: mv.name, tags.MODEL_VERSION: str(mv.version), tags.TRAINING_RUN_ID: str(run_id)}


def score_files(pred: str | Path, ref: str | Path) -> dict[str, Any]:
    """Score a segmentation file against a reference on the same grid (liver = label >= 1 in both).

    Both are read with ingest's checks and limits (`lits.read_labels`): a bad file is one InputError
    naming it. Each is kept as a liver mask (1 byte per voxel) as soon as it is read."""
    r, r_affine = _liver(ref)
    p, p_affine = _liver(pred)
    if p.shape != r.shape:
        raise InputError(f"{Path(pred).name}: shape {p.shape} differs from reference {Path(ref).name} {r.shape}")
    if not np.allclose(p_affine, r_affine, atol=AFFINE_TOL):
        raise InputError(f"{Path(pred).name}: affine differs from reference {Path(ref).name} (grids must match)")
    spacing = tuple(float(s) for s in voxel_sizes(r_affine))
    scores = score_volume(p, r, spacing)
    return {k: finite(scores[k]) for k in CASE_METRICS}


def _liver(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(liver mask (X, Y, Z) uint8 0/1, affine) of a label file; the decoded file is let go at once."""
    labels, affine = read_labels(path)
    return (labels >= 1).view(np.uint8), affine
