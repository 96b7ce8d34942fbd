import nibabel as nib
import numpy as np
import pytest

from liverseg.core.errors import InputError
from liverseg.data.lits import discover, from_canonical, read_case, read_volume, to_canonical
from support.nifti import nifti2_declaring


def test_real_ct_reads_as_ras(real_ct):
    cases, errors = discover(real_ct)
    assert errors == [] and [c.case_id for c in cases] == ["0"]
    vol = read_case(cases[0])
    assert vol.shape == (122, 101, 30) and vol.image.shape == (30, 101, 122)
    assert vol.image.dtype == np.int16 and vol.mask.dtype == np.uint8
    assert vol.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert nib.aff2axcodes(vol.canonical_affine) == ("R", "A", "S")
    assert set(np.unique(vol.mask)) == {0, 1}
    liver_hu = vol.image[vol.mask == 1]
    assert 20 < np.median(liver_hu) < 200  # real liver parenchyma
    assert vol.image.min() < -900  # air around the patient


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("R", "A", "S"), ("S", "L", "A"), ("P", "I", "R")])
def test_canonical_round_trip(codes):
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, ornt_transform

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 100, (5, 6, 7)).astype(np.int16)
    t = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes))
    affine = np.diag([2.0, 3.0, 4.0, 1.0]) @ inv_ornt_aff(t, arr.shape)
    assert nib.aff2axcodes(affine) == codes
    canon, canon_aff = to_canonical(arr, affine)
    assert nib.aff2axcodes(canon_aff) == ("R", "A", "S")
    assert np.array_equal(from_canonical(canon, affine), arr)


def test_same_anatomy_whatever_the_orientation(tmp_path, real_ct):
    img = nib.load(str(real_ct / "volume-0.nii.gz"))
    flipped = nib.Nifti1Image(
        np.asarray(img.dataobj)[::-1, :, ::-1].copy(),
        img.affine @ np.array([[-1, 0, 0, 121], [0, 1, 0, 0], [0, 0, -1, 29], [0, 0, 0, 1]], float),
    )
    nib.save(flipped, tmp_path / "volume-1.nii")
    a, b = read_volume(real_ct / "volume-0.nii.gz"), read_volume(tmp_path / "volume-1.nii")
    assert np.array_equal(a.image, b.image)
    assert np.allclose(a.canonical_affine, b.canonical_affine)


def test_scaled_intensities_float_labels_and_trailing_axis(tmp_path):
    hu = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) * 10 - 100
    img = nib.Nifti1Image(((hu + 1024) / 2).astype(np.uint16), np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, tmp_path / "volume-5.nii.gz")
    seg = np.zeros((2, 3, 4, 1), np.float32)
    seg[0, 0, 0, 0] = 2.0
    seg[1, 1, 1, 0] = 1.0
    nib.save(nib.Nifti1Image(seg, np.eye(4)), tmp_path / "segmentation-5.nii.gz")
    (case,), _ = discover(tmp_path)
    vol = read_case(case)
    assert vol.image.dtype == np.int16 and vol.image.min() == -100 and vol.image.max() == 130
    assert sorted(np.unique(vol.mask)) == [0, 1, 2]


def test_volume_without_segmentation_is_discovered_for_inference(tmp_path, real_ct):
    import shutil

    shutil.copy(real_ct / "volume-0.nii.gz", tmp_path / "volume-9.nii.gz")
    (case,), errors = discover(tmp_path)
    assert case.segmentation is None and errors == []
    with pytest.raises(InputError, match="missing segmentation-9"):
        read_case(case)


def test_not_a_folder(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        discover(tmp_path / "nope")


def test_gunzip_limit_truncation_and_passthrough():
    import gzip as gz

    from liverseg.data.lits import gunzip

    data = bytes(range(256)) * 100
    assert gunzip(gz.compress(data), "a.nii.gz") == data and gunzip(data, "a.nii") is data
    with pytest.raises(InputError, match=r"^a.nii.gz: decompresses to more than 1000 bytes \(too large\)$"):
        gunzip(gz.compress(data), "a.nii.gz", limit=1000)
    with pytest.raises(InputError, match=r"^a.nii.gz: cannot decode"):
        gunzip(gz.compress(data)[:-20], "a.nii.gz")


def test_gunzip_limit_holds_for_every_layer_together():
    """A nested gzip once passed the limit layer by layer: 2.6 kB in, 1.5 GB in memory."""
    import gzip as gz

    from liverseg.data.lits import gunzip

    data = bytes(range(256)) * 100
    nested = gz.compress(gz.compress(gz.compress(data)))
    assert gunzip(nested, "a.nii.gz") == data
    assert gunzip(nested, "a.nii.gz", limit=2 * len(data)) == data
    with pytest.raises(InputError, match="too large"):
        gunzip(nested, "a.nii.gz", limit=len(data))  # the outer layers count too
    bomb = gz.compress(gz.compress(bytes(200_000_000)))  # ~0.3 MB in, 200 MB out
    with pytest.raises(InputError, match="more than 4000000 bytes"):
        gunzip(bomb, "bomb.nii.gz", limit=4_000_000)


@pytest.mark.parametrize("klass", [nib.Nifti1Image, nib.Nifti2Image])
def test_nifti1_and_nifti2_read_alike(tmp_path, klass):
    a = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    path = tmp_path / "volume-0.nii.gz"
    nib.save(klass(a, np.eye(4)), str(path))
    vol = read_volume(path)
    assert vol.shape == (2, 3, 4) and np.array_equal(vol.image, a.transpose(2, 1, 0))


def test_gunzip_reads_every_member_and_refuses_trailing_garbage():
    """bgzip / `cat a.gz b.gz` is valid gzip (serve said "truncated", predict "not a NIfTI"), while bytes
    of garbage after the gzip data were silently dropped."""
    import gzip as gz

    from liverseg.data.lits import gunzip

    a, b = bytes(range(256)) * 40, bytes(7000)
    members = gz.compress(a) + gz.compress(b) + gz.compress(b"")  # bgzip ends with an empty member
    assert gunzip(members, "a.nii.gz") == a + b
    assert gunzip(members, "a.nii.gz", limit=len(a) + len(b)) == a + b
    with pytest.raises(InputError, match="too large"):
        gunzip(members, "a.nii.gz", limit=len(a) + len(b) - 1)  # the second member counts too
    both_layers = len(members) + len(a) + len(b)  # an inner layer's members count with the outer layer
    assert gunzip(gz.compress(members), "a.nii.gz", limit=both_layers) == a + b
    with pytest.raises(InputError, match="too large"):
        gunzip(gz.compress(members), "a.nii.gz", limit=both_layers - 1)
    with pytest.raises(InputError, match=r"^a.nii.gz: cannot decode \(7 bytes of trailing garbage after the gzip"):
        gunzip(gz.compress(a) + b"garbage", "a.nii.gz")
    with pytest.raises(InputError, match=r"^a.nii.gz: cannot decode \(truncated gzip stream\)$"):
        gunzip(gz.compress(a) + gz.compress(b)[:-5], "a.nii.gz")
    many = b"".join(gz.compress(a[i : i + 100]) for i in range(0, len(a), 100))  # 103 small members
    assert gunzip(many, "a.nii.gz", limit=len(a)) == a


@pytest.mark.parametrize("dims", [(2**32, 2**32, 1), (2**62, 4, 1), (2**40, 2**40, 2**40), (1, 1, 4_000_000)])
def test_declared_shape_beyond_the_data_is_one_line(dims):
    """The voxel count once wrapped around in int64 and reshape raised an uncaught ValueError."""
    with pytest.raises(
        InputError, match=r"^u.nii: declared shape \(.*\) of uint8 exceeds the data \(\d+ bytes declared"
    ):
        read_volume("u.nii", data=nifti2_declaring(dims))
