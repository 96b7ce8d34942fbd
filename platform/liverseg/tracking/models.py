"""Models in MLflow: log a model folder with the pyfunc flavour, parse and resolve registry URIs, fetch a
logged model's two files and check them against their registry version, load it.

liverseg downloads only `MLmodel` (YAML, to find the folder), the spec and the weights: no pickle is ever
read, and a registered version's files must match the sha256 tags recorded at registration. The pyfunc
flavour (`pyfunc.py`, for `mlflow models serve`) is logged beside them and never run by liverseg.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import liverseg
from liverseg.core.errors import ModelError, RegistryError
from liverseg.core.files import sha256_file
from liverseg.core.limits import MAX_METADATA_BYTES
from liverseg.model.artifact import SPEC_FILE, WEIGHTS_FILE, LoadedModel, load_local
from liverseg.tracking import tags
from liverseg.tracking.runs import client, failure, not_found, tracking_uri


def digests(model_dir: str | Path) -> dict[str, str]:
    """sha256 of the weights and of the spec file, as registry version tags."""
    return {
        tags.WEIGHTS_SHA256: sha256_file(Path(model_dir) / WEIGHTS_FILE),
        tags.SPEC_SHA256: sha256_file(Path(model_dir) / SPEC_FILE),
    }


def log_model(model_dir: str | Path, name: str = "model", step: int = 0) -> Any:
    """Log a model folder in the active MLflow run, with the pyfunc flavour for `mlflow models serve`
    (the flavour's code is `pyfunc.py`, logged as a file; liverseg never loads it). Returns ModelInfo.

    `step`: the epoch the weights come from; MLflow copies the run's metrics of that step onto the
    LoggedModel (its page and the models table then show the saved epoch's scores, not epoch 0's)."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, -1, -1), "volume"),
                TensorSpec(np.dtype(np.float64), (4, 4), "affine"),
            ]
        ),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
        params=ParamSchema([ParamSpec("lcc", "boolean", True)]),
    )
    example = {"volume": np.full((16, 16, 2), -100.0, np.float32), "affine": np.eye(4)}
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("pyfunc.py")),
        artifacts={"model_dir": str(model_dir)},
        signature=signature,
        input_example=example,
        code_paths=[str(Path(liverseg.__file__).parent)],  # the whole package: pyfunc.py imports model/
        pip_requirements=_requirements(),
        step=step,
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = ["torch", "segmentation-models-pytorch", "timm", "numpy", "scipy", "nibabel", "isal", "pillow", "mlflow"]
    return [f"{p}=={version(p)}" for p in pkgs]


@dataclass(frozen=True)
class ModelRef:
    """A registry model URI taken apart: models:/NAME@ALIAS or models:/NAME/VERSION."""

    name: str
    alias: str | None = None
    version: str | None = None

    @property
    def pinned(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.version else f"models:/{self.name}@{self.alias}"


def parse_model_uri(uri: str) -> ModelRef | None:
    """models:/NAME@ALIAS or models:/NAME/N -> ModelRef; None for other URIs (runs:/, models:/MODEL_ID,
    a folder). The one place registry URIs are parsed."""
    if not uri.startswith("models:/"):
        return None
    ref = uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return ModelRef(name, alias=alias) if name and alias else None
    if "/" in ref:
        name, version = ref.split("/", 1)
        return ModelRef(name, version=version) if name and version else None
    return None


def resolve_version(client: Any, uri: str) -> Any:
    """models:/NAME@ALIAS or models:/NAME/N -> the MLflow ModelVersion. RegistryError when absent; a
    refused login, a refused permission or a server down is said as such (`runs.failure`)."""
    ref = parse_model_uri(uri)
    if ref is None:
        raise RegistryError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        return client.get_model_version(ref.name, ref.version)
    except Exception as e:
        raise failure(e, uri) from None


def _artifact_root(client: Any, uri: str) -> tuple[str, Any]:
    """A model URI -> (artifact URI of its MLmodel folder, ModelVersion or None)."""
    if uri.startswith("runs:/"):
        return uri.rstrip("/"), None
    if not uri.startswith("models:/"):
        raise ModelError(f"{uri}: expected models:/NAME@ALIAS, models:/NAME/N, models:/MODEL_ID, runs:/ or a folder")
    if parse_model_uri(uri) is not None:
        mv = resolve_version(client, uri)
        return f"models:/{mv.name}/{mv.version}", mv  # pinned: an alias may move while we download
    try:
        return client.get_logged_model(uri[len("models:/") :]).artifact_location, None
    except Exception as e:
        raise (ModelError(f"{uri}: no such logged model") if not_found(e) else failure(e, uri)) from None


def _download(root: str, path: str, dst: Path, uri: str) -> Path:
    import mlflow.artifacts

    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{root}/{path}", dst_path=str(dst), tracking_uri=tracking_uri()
            )
        )
    except Exception as e:  # absent (a run without this model), or the server or its artifact store failing
        err = failure(e, f"{uri}: {path}")
        absent = isinstance(err, RegistryError) or isinstance(e, FileNotFoundError)
        raise (ModelError(f"{uri}: cannot download {path} (not there)") if absent else err) from None


def fetch(client: Any, uri: str, dst: str | Path) -> tuple[Path, Any]:
    """Download a logged model's spec and weights (only those) into `dst`; returns (folder, ModelVersion
    or None). `MLmodel` is read as YAML to find the folder; nothing else of the model is fetched."""
    root, mv = _artifact_root(client, uri)
    dst = Path(dst)
    folder = model_folder(_download(root, "MLmodel", dst / "mlmodel", uri), uri)
    out = dst / "model"
    for name in (SPEC_FILE, WEIGHTS_FILE):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        _download(root, f"{folder}/{name}", dst / "files", uri).replace(out / name)
    return out, mv


def model_folder(mlmodel: Path, uri: str) -> str:
    """The folder holding spec and weights that MLmodel names (flavors.python_function.artifacts.model_dir
    .path), relative to the model. MLmodel is not covered by the registry's digests: anything else in it
    (too large, not YAML, not a mapping, a path of another type, absolute or leaving the model) is one
    ModelError naming the model."""
    import yaml

    size = mlmodel.stat().st_size
    if size > MAX_METADATA_BYTES:
        raise ModelError(f"{uri}: MLmodel is {size} bytes, more than {MAX_METADATA_BYTES}: not a liverseg model's")
    try:
        doc = yaml.safe_load(mlmodel.read_bytes())
    except (yaml.YAMLError, RecursionError, ValueError) as e:  # ValueError: not UTF-8 (UnicodeDecodeError)
        raise ModelError(f"{uri}: MLmodel is not YAML ({type(e).__name__})") from None
    try:
        folder = doc["flavors"]["python_function"]["artifacts"]["model_dir"]["path"]
    except (KeyError, TypeError, IndexError):
        raise ModelError(f"{uri}: not a liverseg model (its MLmodel names no model_dir artifact)") from None
    parts = folder.split("/") if isinstance(folder, str) else []
    if not parts or any(p in ("", ".", "..") or "\\" in p or not p.isprintable() for p in parts):
        shown = repr(folder)[:80] if isinstance(folder, str) else f"a {type(folder).__name__}"
        raise ModelError(f"{uri}: MLmodel's model_dir path {shown} is not a folder inside the model")
    return folder


def verify_version(model_dir: str | Path, mv: Any) -> dict[str, str]:
    """Refuse files that differ from the sha256 tags of their registry version, and a version without
    them (`register` and `promote` write them; a tag blanked by someone who may edit it proves nothing).
    Returns the digests checked."""
    found = digests(model_dir)
    for tag, label in ((tags.WEIGHTS_SHA256, "weights"), (tags.SPEC_SHA256, "spec")):
        want = (mv.tags or {}).get(tag)
        if not want:
            raise ModelError(
                f"{mv.name} v{mv.version}: no {tag} tag to check its {label} against; refusing to load "
                "(versions made by `liverseg register` or `promote` carry it)"
            )
        if want != found[tag]:
            raise ModelError(
                f"{mv.name} v{mv.version}: {label} sha256 {found[tag][:12]}... does not match the version's "
                f"tag {tag} {want[:12]}...; refusing to load"
            )
    return found


def load_model(uri: str, device: str = "auto") -> LoadedModel:
    """A model folder, or an MLflow model URI (models:/NAME@ALIAS, models:/NAME/N, models:/MODEL_ID,
    runs:/RUN_ID/PATH) -> LoadedModel. Downloads the spec and weights only; a registry version's files
    are checked against its sha256 tags."""
    if not uri.startswith(("models:/", "runs:/")):
        if not Path(uri).is_dir():
            raise ModelError(f"{uri}: not a model folder nor a models:/NAME@ALIAS, models:/NAME/N or runs:/ URI")
        return load_local(uri, device)
    with tempfile.TemporaryDirectory(prefix="liverseg-model-") as tmp:
        model_dir, mv = fetch(client(), uri, tmp)
        checked = verify_version(model_dir, mv) if mv is not None else None
        lm = load_local(model_dir, device)
    lm.uri, lm.version, lm.sha256 = (f"models:/{mv.name}/{mv.version}" if mv is not None else uri), mv, checked
    return lm
