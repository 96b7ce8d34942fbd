"""The MLflow pyfunc that carries a liverseg model with its preprocessing (kept apart from `inference`
so that inference needs no MLflow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from liverseg.inference import load_local, segment_volume


class LiverSegPythonModel(mlflow.pyfunc.PythonModel):
    """predict({"volume": (X, Y, Z) HU, "affine": (4, 4)}) -> (X, Y, Z) uint8 mask on the same grid.

    Pickled by reference; the package ships with the model in code_paths.
    """

    def load_context(self, context: Any) -> None:
        self.lm = load_local(Path(context.artifacts["model_dir"]))

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads the explicit signature
        if isinstance(model_input, dict):
            volume, affine = model_input["volume"], model_input.get("affine", np.eye(4))
        else:  # a bare array: identity affine
            volume, affine = np.asarray(model_input), np.eye(4)
        lcc = bool((params or {}).get("lcc", True))
        return segment_volume(self.lm, np.asarray(volume, dtype=np.float32), np.asarray(affine, dtype=np.float64), lcc)


def log_pyfunc(model_dir: str | Path, name: str = "model", step: int = 0) -> Any:
    """Log a saved model directory as an MLflow pyfunc in the active run; returns mlflow's ModelInfo.

    `step`: the epoch the weights come from; MLflow copies the run's metrics of that step onto the
    LoggedModel (its page and the models table then show the saved epoch's scores, not epoch 0's).
    """
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
        python_model=LiverSegPythonModel(),
        artifacts={"model_dir": str(model_dir)},
        signature=signature,
        input_example=example,
        code_paths=[str(Path(__file__).parent)],
        pip_requirements=_requirements(),
        step=step,
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = ["torch", "segmentation-models-pytorch", "timm", "numpy", "scipy", "nibabel", "mlflow", "zarr"]
    return [f"{p}=={version(p)}" for p in pkgs]
