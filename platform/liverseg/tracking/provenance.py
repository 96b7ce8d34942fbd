"""What a run was made from, as MLflow records it: the git commit, the DVC hash of an output, the slice
store's content digest and its splits as dataset inputs, the config's hash.

MLflow is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from liverseg.core import env


def git_commit(cwd: str | Path | None = None) -> str:
    """HEAD commit, with '-dirty' when tracked files changed; outside git (a container image) the
    commit the image was built from (`env.GIT_COMMIT`), else 'unknown'."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno"], cwd=cwd, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return env.get(env.GIT_COMMIT) or "unknown"


def dvc_hash(path: str | Path, lock: str | Path = "dvc.lock") -> str:
    """The md5 DVC recorded for `path` as a stage output in dvc.lock (or 'untracked')."""
    lock = Path(lock)
    if not lock.exists():
        return "untracked"
    target = os.path.normpath(os.path.relpath(Path(path).resolve(), lock.resolve().parent))
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if os.path.normpath(out.get("path", "")) == target:
                return str(out.get("md5", "untracked"))
    return "untracked"


def store_digest(store_attrs: dict[str, Any], case_attrs: dict[str, dict[str, Any]]) -> str:
    """Content hash of a slice store: size, splits and every case's array hashes."""
    body = {
        "size": store_attrs["size"],
        "splits": store_attrs["splits"],
        "cases": {c: [a["image_sha256"], a["mask_sha256"]] for c, a in sorted(case_attrs.items())},
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def store_datasets(store: Any, store_path: str, contexts: dict[str, str]) -> list[Any]:
    """A slice store's splits as MLflow dataset inputs: the runs table's Datasets column, the run page's
    inputs, and a digest to compare runs by.

    One per split in `contexts` ({split: context}, e.g. {"train": "training"}): named
    `<store>/<split>`; digest from the split's cases and their stored-array hashes (the same data gives
    the same digest on any machine, whatever the path); source the store's URI; schema the arrays,
    image (-1, H, W) int16 HU and mask (-1, H, W) uint8; profile the case and slice counts.
    """
    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    h, w = store.size
    schema = TensorDatasetSchema(
        Schema([TensorSpec(np.dtype(np.int16), (-1, h, w), "image")]),
        Schema([TensorSpec(np.dtype(np.uint8), (-1, h, w), "mask")]),
    )
    scheme = store_path.split("://")[0] if "://" in store_path else "local"
    out = []
    for split, context in contexts.items():
        cases = store.cases_in(split)
        arrays = [(c, store.case_attrs(c)["image_sha256"], store.case_attrs(c)["mask_sha256"]) for c in cases]
        digest = hashlib.sha256(json.dumps([list(store.size), arrays]).encode()).hexdigest()[:16]  # MLflow: <= 36
        profile = {"cases": len(cases), "slices": sum(store.num_slices(c) for c in cases)}
        ds = Dataset(
            name=f"{store.name}/{split}",
            digest=digest,
            source_type=scheme,
            source=json.dumps({"uri": store_path}),
            schema=json.dumps(schema.to_dict()),
            profile=json.dumps(profile),
        )
        out.append(DatasetInput(ds, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return out


def config_hash(flat: dict[str, Any]) -> str:
    """12 hex digits naming a flat config (sorted keys): runs with the same settings share it."""
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]
