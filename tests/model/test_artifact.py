"""The model artifact: spec format and versions, weights, preprocessing, loading from MLflow URIs without
unpickling anything, and the registry's sha256 check."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from liverseg.core.errors import LiversegError, ModelError
from liverseg.model.artifact import SPEC_FILE, WEIGHTS_FILE, ModelSpec, load_local, model_inputs, save_local
from liverseg.tracking.models import load_model
from liverseg.tracking.tags import SPEC_SHA256 as SPEC_TAG
from liverseg.tracking.tags import WEIGHTS_SHA256 as WEIGHTS_TAG
from support.models import constant_state, log_model_run, spec


def test_save_and_load_round_trip(tmp_path):
    s, state = spec(), constant_state(liver=True)
    save_local(tmp_path, state, s)
    assert json.loads((tmp_path / SPEC_FILE).read_text())["format_version"] == 2
    lm = load_local(tmp_path, "cpu")
    assert lm.spec == s and all(torch.equal(v, lm.net.state_dict()[k]) for k, v in state.items())
    with pytest.raises(dataclasses.FrozenInstanceError):
        lm.spec.mean = 0.5


def test_unknown_format_version_is_one_line(tmp_path):
    (tmp_path / SPEC_FILE).write_text(json.dumps({**spec().to_dict(), "format_version": 7}))
    (tmp_path / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(ModelError) as e:
        load_local(tmp_path, "cpu")
    assert "format version 7" in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, LiversegError)


def test_pickled_code_in_weights_is_refused_unrun(tmp_path):
    """weights.pt that is a pickle of code (not a state dict): weights_only refuses it before it runs."""
    save_local(tmp_path, constant_state(liver=True), spec())
    marker = tmp_path / "pwned"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Trap()}, tmp_path / WEIGHTS_FILE)
    with pytest.raises(ModelError, match="unusable weights"):
        load_local(tmp_path, "cpu")
    assert not marker.exists()


def test_invalid_spec_field_is_named():
    with pytest.raises(ModelError, match="in_channels 2"):
        ModelSpec("resnet18", 2, (-200.0, 250.0), 0.2, 0.3, (64, 64))


def test_version_1_meta_still_loads(tmp_path):
    """A model folder saved before the spec (`meta_version` 1, untyped keys) loads and predicts alike."""
    state = constant_state(liver=True)
    torch.save(state, tmp_path / WEIGHTS_FILE)
    old = {
        "meta_version": 1,
        "encoder": "resnet18",
        "decoder_channels": [32, 16, 16, 8, 8],
        "in_channels": 1,
        "classes": ["background", "liver"],
        "window": [-200.0, 250.0],
        "mean": 0.2,
        "std": 0.3,
        "size": [64, 64],
        "orientation": "RAS",
        "units": "HU",
        "lcc": True,
        "best_epoch": 3,
        "val_dice": 0.9,
        "train_run_id": "abc",
    }
    (tmp_path / SPEC_FILE).write_text(json.dumps(old))
    lm = load_local(tmp_path, "cpu")
    assert dataclasses.replace(lm.spec, train_run_id="", best_epoch=-1, val_dice=None) == spec()
    assert (lm.spec.train_run_id, lm.spec.best_epoch, lm.spec.val_dice) == ("abc", 3, 0.9)
    assert lm.net(torch.zeros(1, 1, 64, 64)).argmax(1).all()


def test_three_channel_inputs_are_the_slice_and_its_neighbours():
    s = spec(in_channels=3)
    hu = torch.arange(4, dtype=torch.int16).view(4, 1, 1).expand(4, 2, 2) * 100  # slice k has HU 100k
    x = model_inputs(hu, s)
    assert x.shape == (4, 3, 2, 2)
    raw = torch.round((x[:, :, 0, 0] * s.std + s.mean) * (s.window[1] - s.window[0]) + s.window[0])
    assert raw.tolist() == [[0, 0, 100], [0, 100, 200], [100, 200, 250], [200, 250, 250]]  # ends clamped


def test_three_channel_model_segments_a_volume(tmp_path, real_ct):
    from liverseg.model.inference import predict_file
    from liverseg.model.network import build_model

    net = build_model("resnet18", "none", 3, [32, 16, 16, 8, 8])
    head = net.segmentation_head[0]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 10.0]))
    save_local(tmp_path / "m", net.state_dict(), spec(in_channels=3))
    lm = load_local(tmp_path / "m", "cpu")
    predict_file(lm, real_ct / "volume-0.nii.gz", tmp_path / "mask.nii.gz")
    mask = nib.load(str(tmp_path / "mask.nii.gz"))
    assert mask.shape == nib.load(str(real_ct / "volume-0.nii.gz")).shape and np.asanyarray(mask.dataobj).all()


def _location(client, model_uri: str) -> Path:
    return Path(client.get_logged_model(model_uri.split("/")[-1]).artifact_location)


def _booby_trap(model_root: Path, marker: Path) -> None:
    """Plant code that creates `marker` wherever a loader could run it: a pickled python_model and the
    flavour's model code."""

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (model_root / "python_model.pkl").write_bytes(pickle.dumps(Trap()))
    for code in model_root.glob("*.py"):
        code.write_text(f"open({str(marker)!r}, 'w')\n")


def test_every_uri_form_loads_the_same_weights(mlflow_uri):
    from liverseg.registry.register import register
    from liverseg.tracking.runs import client

    rid, uri = log_model_run(constant_state(liver=True))
    mv = register(run_id=rid)
    assert mv.tags[WEIGHTS_TAG] and mv.tags[SPEC_TAG]
    ref = load_local(_location(client(), uri) / "artifacts" / "m", "cpu").net.state_dict()
    for form in (uri, f"runs:/{rid}/model", f"models:/{mv.name}@challenger", f"models:/{mv.name}/{mv.version}"):
        lm = load_model(form, "cpu")
        assert lm.spec == spec() and all(torch.equal(v, lm.net.state_dict()[k]) for k, v in ref.items()), form
    assert load_model(f"models:/{mv.name}@challenger").uri == f"models:/{mv.name}/{mv.version}"


def test_tampered_weights_are_refused(mlflow_uri):
    from liverseg.registry.register import register
    from liverseg.tracking.runs import client

    rid, uri = log_model_run(constant_state(liver=True))
    mv = register(run_id=rid)
    folder = _location(client(), uri) / "artifacts" / "m"
    torch.save(constant_state(liver=False), folder / WEIGHTS_FILE)  # a valid state dict, other values
    with pytest.raises(ModelError) as e:
        load_model(f"models:/{mv.name}@challenger", "cpu")
    assert f"{mv.name} v{mv.version}: weights sha256" in str(e.value) and "\n" not in str(e.value)
    assert load_model(uri, "cpu").spec == spec()  # not a registry version: nothing to check against


def test_no_liverseg_command_runs_code_from_the_artifact_store(mlflow_uri, store_path, tmp_path, real_ct):
    """A pickled python_model (models logged before) and the flavour's code in the store are never run:
    predict, evaluate, promote, serve's start and its /reload all read weights and spec only."""
    from fastapi.testclient import TestClient

    from liverseg.model.inference import predict_file
    from liverseg.registry.evaluate import evaluate
    from liverseg.registry.promote import promote
    from liverseg.registry.register import register
    from liverseg.serving.app import create_app
    from liverseg.serving.holder import ModelHolder
    from liverseg.tracking.runs import client

    marker = tmp_path / "pwned"
    rid, uri = log_model_run(constant_state(liver=True), store_path=store_path)
    candidate = f"models:/{register(run_id=rid).name}@challenger"
    _booby_trap(_location(client(), uri), marker)
    predict_file(load_model(candidate, "cpu"), real_ct / "volume-0.nii.gz", tmp_path / "m.nii")
    evaluate(candidate, store_path, "test", device="cpu")
    assert promote(store_path, min_dice=0.0).promoted
    holder = ModelHolder("models:/liver-unet@champion", "cpu")
    app = TestClient(create_app(holder, reload_token="t0ken"))
    assert app.post("/reload").status_code == 401  # unauthenticated: refused before anything loads
    assert app.post("/reload", headers={"Authorization": "Bearer t0ken"}).json()["version"] == "1"
    assert not marker.exists()
    pickle.loads((_location(client(), uri) / "python_model.pkl").read_bytes())  # the trap is real
    assert marker.exists()


def test_pyfunc_flavour_round_trip(mlflow_uri, real_ct):
    """For `mlflow models serve` users: MLflow's own loader runs the flavour (and trusts the store)."""
    import mlflow.pyfunc

    _, uri = log_model_run(constant_state(liver=False))
    model = mlflow.pyfunc.load_model(uri)
    img = nib.load(str(real_ct / "volume-0.nii.gz"))
    out = model.predict({"volume": np.asanyarray(img.dataobj).astype(np.float32), "affine": img.affine})
    assert out.shape == img.shape and out.dtype == np.uint8 and out.sum() == 0
    assert model.metadata.get_input_schema().input_names() == ["volume", "affine"]


def test_model_logged_before_the_spec_loads_without_its_pickle(mlflow_uri, tmp_path):
    """A model logged by earlier liverseg versions: pickled python_model, `meta_version` 1 metadata.
    It loads from the registry through the spec and weights alone; its pickle is never read."""
    import mlflow
    import mlflow.pyfunc

    from liverseg.registry.register import register
    from liverseg.tracking.runs import client

    folder = tmp_path / "model_files"
    folder.mkdir()
    torch.save(constant_state(liver=True), folder / WEIGHTS_FILE)
    old = {"meta_version": 1, **{k: v for k, v in spec().to_dict().items() if k not in ("format", "format_version")}}
    (folder / SPEC_FILE).write_text(json.dumps(old))
    rid, _ = log_model_run(constant_state(liver=False))  # a run with lineage tags; its model is replaced below
    with mlflow.start_run(run_id=rid):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=mlflow.pyfunc.PythonModel(), artifacts={"model_dir": str(folder)}
        )
    client().set_tag(rid, "model_uri", info.model_uri)
    mv = register(run_id=rid)
    marker = tmp_path / "pwned"
    _booby_trap(_location(client(), info.model_uri), marker)
    lm = load_model(f"models:/{mv.name}/{mv.version}", "cpu")
    assert lm.spec.format_version == 2 and lm.spec.window == spec().window and not marker.exists()
    assert lm.net(torch.zeros(1, 1, 64, 64)).argmax(1).all()  # the weights of the old folder
