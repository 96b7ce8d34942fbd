"""Logged and registered models in MLflow: URIs parsed once, and models logged before the package moved
into rooms still register and load."""

import re
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


TAMPERED_MLMODEL = {  # MLmodel is not covered by the registry's digests: whatever it holds is one line
    "not-yaml": (b"flavors: [unclosed\n  - {", "MLmodel is not YAML"),
    "not-utf8": (b"\x80\x81flavors", "MLmodel is not YAML"),
    "deep": (b"[" * 200_000, "MLmodel is not YAML"),
    "a-list": (b"- 1\n- 2\n", "names no model_dir artifact"),
    "a-string": (b"just text\n", "names no model_dir artifact"),
    "flavors-a-list": (b"flavors: [1, 2]\n", "names no model_dir artifact"),
    "path-a-number": (b"flavors: {python_function: {artifacts: {model_dir: {path: 123}}}}\n", "a int is not"),
    "path-a-list": (b"flavors: {python_function: {artifacts: {model_dir: {path: [a]}}}}\n", "a list is not"),
    "path-up": (b"flavors: {python_function: {artifacts: {model_dir: {path: ../../x}}}}\n", "'../../x' is not"),
    "path-absolute": (b"flavors: {python_function: {artifacts: {model_dir: {path: /etc}}}}\n", "'/etc' is not"),
    "path-empty": (b"flavors: {python_function: {artifacts: {model_dir: {path: ''}}}}\n", "'' is not"),
    "huge": (b"# " + b"x" * (5 << 20) + b"\n", "MLmodel is 5242883 bytes"),
}


def test_a_tampered_mlmodel_is_one_line(mlflow_uri, tmp_path):
    """Before: a 171-line traceback (yaml, KeyError, TypeError, a path leaving the model). After: one
    ModelError naming the model, from load_model and from the command."""
    from pathlib import Path

    from liverseg.core.errors import ModelError
    from liverseg.registry.register import register
    from liverseg.tracking.runs import client
    from support.cli import run_liverseg
    from support.models import log_model_run

    _, uri = log_model_run(constant_state(liver=True))
    mv = register(run_id=_)
    mlmodel = Path(client().get_logged_model(uri.split("/")[-1]).artifact_location) / "MLmodel"
    original = mlmodel.read_bytes()
    ct = tmp_path / "ct.nii.gz"
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((16, 16, 4), np.int16), np.eye(4)), str(ct))
    for case, (content, says) in TAMPERED_MLMODEL.items():
        mlmodel.write_bytes(content)
        with pytest.raises(ModelError, match=re.escape(says)) as e:
            load_model(f"models:/{mv.name}/{mv.version}", "cpu")
        assert str(e.value).startswith(f"models:/{mv.name}/{mv.version}: ") and "\n" not in str(e.value), case
    res = run_liverseg(["predict", str(ct), str(tmp_path / "m.nii.gz"), "--model", f"models:/{mv.name}/1"])
    last = res.stderr.strip().splitlines()[-1]  # after MLflow's download bar
    assert res.returncode == 1 and last.startswith("error: ") and "MLmodel is 5242883 bytes" in last
    assert "Traceback" not in res.stderr
    mlmodel.write_bytes(original)
    assert load_model(f"models:/{mv.name}/{mv.version}", "cpu").spec.encoder == "resnet18"


@pytest.mark.parametrize(
    "change, says",
    [
        ({"size": 5}, "spec size 5 is not 2 integers"),
        ({"window": ["a", "b"]}, "spec window"),
        ({"encoder": 7}, "spec encoder 7 is not text"),
        ({"decoder_channels": [1, 2]}, "is not 5 positive integers"),
        ({"mean": None}, "spec mean null is not a number"),
        ({"lcc": "yes"}, "is not true or false"),
        ({"classes": "ab"}, "is not 2 names"),
        ("[" * 100_000, "unreadable model spec (RecursionError)"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_a_tampered_spec_is_one_line(tmp_path, change, says):
    """liverseg.json read from a folder (or a runs:/ URI, not digest-checked): wrong types are one line."""
    import json

    from liverseg.core.errors import ModelError
    from liverseg.model.artifact import load_local, save_local
    from support.models import spec

    save_local(tmp_path / "m", constant_state(liver=True), spec())
    path = tmp_path / "m" / "liverseg.json"
    if isinstance(change, dict):
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    else:
        path.write_text(change)
    with pytest.raises(ModelError, match=re.escape(says)) as e:
        load_local(tmp_path / "m", "cpu")
    assert "\n" not in str(e.value)
