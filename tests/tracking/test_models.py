"""Logged and registered models in MLflow: URIs parsed once, and models logged before the package moved
into rooms still register and load."""

import shutil

import numpy as np
import pytest
import torch

from liverseg.tracking.models import ModelRef, load_model, parse_model_uri
from support.models import constant_state
from support.paths import REPO

MODEL_0_1 = REPO / "tests" / "fixtures" / "model-0.1"


@pytest.mark.parametrize(
    "uri, ref",
    [
        ("models:/liver-unet@champion", ModelRef("liver-unet", alias="champion")),
        ("models:/liver-unet-candidates/12", ModelRef("liver-unet-candidates", version="12")),
        ("models:/m-acfde8b06fda4e15bd4a79da3464b9de", None),  # a logged model id, not a registry version
        ("runs:/abc/model", None),
        ("models:/@champion", None),
        ("models:/liver-unet/", None),
        ("/tmp/model", None),
    ],
)
def test_model_uris_are_parsed_in_one_place(uri, ref):
    assert parse_model_uri(uri) == ref
    if ref is not None:
        assert parse_model_uri(ref.pinned) == ref


def test_a_model_logged_by_liverseg_0_1_registers_and_loads(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from liverseg.model.inference import segment_volume
    from liverseg.registry.register import register
    from liverseg.tracking import tags

    folder = tmp_path / "model"
    shutil.copytree(MODEL_0_1, folder, ignore=shutil.ignore_patterns("README.md"))
    torch.save(constant_state(liver=True), folder / "artifacts" / "m" / "weights.pt")
    client = MlflowClient()
    run = client.create_run(client.create_experiment("old")).info.run_id
    client.log_artifacts(run, str(folder), "model")
    client.set_tag(run, tags.MODEL_URI, f"runs:/{run}/model")
    mv = register(run_id=run)
    lm = load_model(f"models:/{mv.name}@challenger", "cpu")
    assert lm.uri == f"models:/liver-unet-candidates/{mv.version}" and lm.spec.encoder == "resnet18"
    mask = segment_volume(lm, np.full((40, 40, 6), 50, np.float32), np.eye(4))
    assert mask.shape == (40, 40, 6) and mask.all()  # the constant model marks every voxel liver
