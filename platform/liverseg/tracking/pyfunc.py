"""The MLflow pyfunc flavour of a liverseg model, for `mlflow models serve` and `mlflow.pyfunc.load_model`.

This file is logged as the model's code (MLflow's models-from-code; see `artifact.log_model`) and
executed by MLflow when it loads the model: that path trusts the artifact store, by MLflow's design.
liverseg itself never imports or runs it: its commands load the weights and spec with `artifact`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np

from liverseg.model.artifact import load_local
from liverseg.model.inference import segment_volume


class LiverSegPythonModel(mlflow.pyfunc.PythonModel):
    """predict({"volume": (X, Y, Z) HU, "affine": (4, 4)}) -> (X, Y, Z) uint8 mask on the same grid."""

    def load_context(self, context: Any) -> None:
        self.lm = load_local(Path(context.artifacts["model_dir"]))

    # MLflow hands the signature's named tensors over as a dict of arrays; the np.ndarray hint is one MLflow
    # infers nothing from, so the explicit signature rules and no "add type hints" warning is raised
    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        if isinstance(model_input, dict):
            volume, affine = model_input["volume"], model_input.get("affine", np.eye(4))
        else:  # a bare array: identity affine
            volume, affine = np.asarray(model_input), np.eye(4)
        lcc = bool((params or {}).get("lcc", self.lm.spec.lcc))
        return segment_volume(self.lm, np.asarray(volume, dtype=np.float32), np.asarray(affine, dtype=np.float64), lcc)


mlflow.models.set_model(LiverSegPythonModel())  # models-from-code: what MLflow takes from this file
