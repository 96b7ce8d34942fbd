"""NIfTI bytes before their voxels: the header read through every gzip layer and checked against the
limits in every dimension before a voxel is decompressed (the shared reader of serve, predict, ingest)."""

import gzip
import io
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from liverseg.core.errors import InputError, TooLarge
from liverseg.core.limits import VolumeLimits
from liverseg.data.lits import load_nifti, read_volume
from liverseg.data.nifti import head
from support.nifti import nifti2_declaring

AXIAL_FIRST = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)  # file axis 0 is S


def _declaring(dims, dtype=np.uint8, affine=None, tail: bytes = b"") -> bytes:
    """A NIfTI-1 header declaring `dims` of `dtype`, then `tail` where its voxels would be."""
    raw = nib.Nifti1Image(np.zeros((2, 2, 2), dtype), np.eye(4) if affine is None else affine).to_bytes()
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    hdr.set_data_shape(dims)
    return hdr.binaryblock + raw[348:352] + tail


@pytest.mark.parametrize(
    "dims, dtype, affine, limit, fragment",
    [
        ((16000, 16000, 1), np.uint8, None, "max_inplane", "in-plane size 16000 x 16000 exceeds the limit of 2048"),
        ((1, 16000, 16000), np.uint8, AXIAL_FIRST, "max_inplane", "in-plane size 16000 x 16000"),  # axis 0 is S
        ((4000, 1, 1), np.int16, AXIAL_FIRST, "max_slices", "4000 axial slices exceed the limit of 2048"),
        ((2048, 2048, 128), np.uint8, None, "max_voxels", "536870912 voxels exceed the limit of 268435456"),
        ((512, 512, 600), np.float64, None, "max_decoded_mb", "over the limit of 1024 MiB"),
        ((32767, 32767, 32767), np.float32, None, "max_slices", "32767 axial slices"),  # `score` once: MemoryError
    ],
)
def test_each_dimension_is_refused_on_the_header(dims, dtype, affine, limit, fragment):
    """A 1.1 MB upload of 16000 x 16000 x 1 voxels was decoded and segmented (14 s, +2.4 GB)."""
    data = gzip.compress(_declaring(dims, dtype, affine))
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge, match=fragment) as err:
            read_volume("big.nii.gz", data=data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.limit == limit and f"({limit})" in str(err.value)
    assert peak < 2_000_000, peak  # nothing of the declared size was allocated
    named = VolumeLimits(prefix="serve.")
    with pytest.raises(TooLarge, match=rf"\(serve\.{limit}\)$"):
        load_nifti("big.nii.gz", data, named)


def test_a_bomb_behind_a_small_header_stops_past_what_it_declares():
    small = nib.Nifti1Image(np.ones((8, 8, 4), np.uint8), np.eye(4)).to_bytes()  # 352 + 256 bytes
    assert load_nifti("ok.nii.gz", gzip.compress(small + bytes(1000))).shape == (8, 8, 4)  # padding is tolerated
    bomb = gzip.compress(gzip.compress(small + bytes(200_000_000)))  # two layers, 200 MB after the voxels
    with pytest.raises(
        TooLarge, match=r"^b.nii.gz: decompresses to more than 1049184 bytes \(its header declares 608\)$"
    ):
        load_nifti("b.nii.gz", bomb)


def test_the_header_is_found_through_layers_and_members():
    raw = nib.Nifti1Image(np.arange(512, dtype=np.int16).reshape(8, 8, 8), np.eye(4)).to_bytes()
    layered = gzip.compress(gzip.compress(gzip.compress(raw)))
    split = gzip.compress(raw[:7]) + gzip.compress(raw[7:200]) + gzip.compress(raw[200:])  # tiny members
    for data in (raw, layered, split, gzip.compress(split)):
        assert head(data, "x") == raw[:540]
        assert np.array_equal(
            read_volume("x.nii.gz", data=data).image, np.asarray(nib.Nifti1Image.from_bytes(raw).dataobj).T
        )
    deep = raw
    for _ in range(17):
        deep = gzip.compress(deep)
    with pytest.raises(InputError, match=r"cannot decode \(more than 16 nested gzip layers\)"):
        load_nifti("deep.nii.gz", deep)


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"hello world" * 50, "not a NIfTI file (no single-file NIfTI-1 or NIfTI-2 header)"),
        (gzip.compress(bytes(10_000_000)), "not a NIfTI file"),  # zeros: refused on the first 540 bytes
        (_declaring((8, 8, 0)), "empty shape (8, 8, 0)"),
        (nifti2_declaring((1, 1, 4_000_000)), "exceeds the data"),  # uncompressed: the length is known
    ],
)
def test_broken_headers_are_one_line(data, fragment):
    with pytest.raises(InputError, match=None) as err:
        load_nifti("x.nii", data)
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)
