import nibabel as nib
import numpy as np
import pytest

from liverseg.model.artifact import LoadedModel, load_local, save_local
from liverseg.model.inference import predict_file, segment_volume
from support.models import constant_state, spec


@pytest.fixture(scope="module")
def all_liver(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    save_local(d, constant_state(liver=True), spec())
    return load_local(d, "cpu")


def test_predict_real_ct_keeps_shape_and_affine(tmp_path, real_ct, all_liver):
    out = tmp_path / "mask.nii.gz"
    t = predict_file(all_liver, real_ct / "volume-0.nii.gz", out)
    src, mask = nib.load(str(real_ct / "volume-0.nii.gz")), nib.load(str(out))
    assert mask.shape == src.shape and np.array_equal(mask.affine, src.affine)
    assert mask.get_data_dtype() == np.uint8
    assert np.asanyarray(mask.dataobj).all()  # constant model: every voxel liver
    assert set(t) == {"read", "preprocess", "model", "postprocess", "write"}


def test_mask_follows_any_orientation(tmp_path, real_ct):
    """A model that keys on intensity must give the same anatomy whatever the file's axis order."""
    import torch

    from liverseg.model.network import build_model

    net = build_model("resnet18", "none", 1, [32, 16, 16, 8, 8])
    net.eval()
    lm = LoadedModel(net, spec(size=(96, 96)), torch.device("cpu"))
    img = nib.load(str(real_ct / "volume-0.nii.gz"))
    data = np.asanyarray(img.dataobj)
    a = segment_volume(lm, data, img.affine, lcc=False)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1
    perm = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])  # swap i and j
    other = np.ascontiguousarray(data[::-1].transpose(1, 0, 2))
    b = segment_volume(lm, other, img.affine @ flip @ perm, lcc=False)
    assert b.shape == other.shape
    assert np.array_equal(b, np.ascontiguousarray(a[::-1].transpose(1, 0, 2)))


def test_predict_overlay_with_truth(tmp_path, real_ct, all_liver):
    import matplotlib.image as mpimg

    png = tmp_path / "overlay.png"
    t = predict_file(
        all_liver,
        real_ct / "volume-0.nii.gz",
        tmp_path / "m.nii.gz",
        overlay=png,
        truth=real_ct / "segmentation-0.nii.gz",
    )
    img = mpimg.imread(png)[..., :3]
    assert "overlay" in t and img.shape[1] > img.shape[0]
    assert (np.abs(img - [0, 1, 0]).max(-1) < 0.15).sum() > 50  # the reference liver's contour is drawn
