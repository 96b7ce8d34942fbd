"""Logged and registered models in MLflow: URIs parsed once, every URI form loading the same weights
without unpickling or running anything from the artifact store, the registry's sha256 check, the pyfunc
flavour, and models logged by older liverseg versions still registering and loading."""

import json
import pickle
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from liverseg.core.errors import ModelError
from liverseg.model.artifact import SPEC_FILE, WEIGHTS_FILE, load_local, save_local
from liverseg.tracking.models import ModelRef, load_model, parse_model_uri
from liverseg.tracking.tags import SPEC_SHA256 as SPEC_TAG
from liverseg.tracking.tags import WEIGHTS_SHA256 as WEIGHTS_TAG
from support.models import constant_state, log_model_run, spec
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
    from liverseg.model.artifact import load_local
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
