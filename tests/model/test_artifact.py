"""The model artifact offline: spec format and versions, weights (never unpickled), preprocessing.
Loading from MLflow URIs and the registry's sha256 check: tests/tracking/test_models.py."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from liverseg.core.errors import LiversegError, ModelError
from liverseg.model.artifact import SPEC_FILE, WEIGHTS_FILE, ModelSpec, load_local, model_inputs, save_local
from support.models import constant_state, spec


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
