import re

import numpy as np
import pytest

from liverseg.core.errors import StoreError
from liverseg.data.store import FORMAT, SliceStore, split_cases


def test_splits_are_deterministic_disjoint_and_sized():
    ids = [str(i) for i in range(131)]
    s = split_cases(ids, (0.7, 0.2, 0.1), seed=0)
    assert [len(s[k]) for k in ("train", "val", "test")] == [92, 26, 13]
    assert sorted(sum(s.values(), []), key=int) == ids
    assert s == split_cases(ids, (0.7, 0.2, 0.1), seed=0)
    assert s != split_cases(ids, (0.7, 0.2, 0.1), seed=1)


def test_tiny_datasets_get_every_split():
    s = split_cases(["0", "1", "2"], (0.7, 0.2, 0.1), seed=0)
    assert all(len(v) == 1 for v in s.values())


def test_adding_a_case_moves_few_cases():
    ids = [str(i) for i in range(100)]
    a = split_cases(ids, (0.7, 0.2, 0.1), seed=0)
    b = split_cases(ids + ["100"], (0.7, 0.2, 0.1), seed=0)
    moved = sum(1 for k in a for c in a[k] if c not in b[k])
    assert moved <= 3


def test_store_round_trip(store_path, phantom_dir):
    from liverseg.data.lits import discover, read_case
    from liverseg.data.resize import resize_slices

    st = SliceStore(store_path)
    assert st.attrs["format"] == FORMAT and st.size == (64, 64) and len(st.cases) == 6
    assert set(sum(st.splits.values(), [])) == set(st.cases)
    case = discover(phantom_dir)[0][0]
    vol = read_case(case)
    img, msk = st.volume(case.case_id)
    assert img.dtype == np.int16 and msk.dtype == np.uint8 and img.shape == (24, 64, 64)
    assert np.array_equal(img, resize_slices(vol.image, (64, 64), False))
    assert np.array_equal(msk, resize_slices(vol.mask, (64, 64), True))
    some_img, some_msk = st.slices(case.case_id, [3, 0, 17])
    assert np.array_equal(some_img, img[[3, 0, 17]]) and np.array_equal(some_msk, msk[[3, 0, 17]])
    a = st.case_attrs(case.case_id)
    assert a["original_shape"] == [64, 64, 24] and len(a["affine"]) == 4 and len(a["volume_sha256"]) == 64
    assert st.verify() == {}


def test_few_files_per_case(store_path):
    from pathlib import Path

    files = [p for p in (Path(store_path) / "cases" / "0").rglob("*") if p.is_file()]
    assert len(files) <= 5  # group + 2 arrays metadata + one shard each


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="cannot open|not a liverseg"):
        SliceStore(str(tmp_path / "missing.zarr"))


def test_unknown_split_lists_valid(store_path):
    with pytest.raises(StoreError, match="unknown split 'dev'.*train"):
        SliceStore(store_path).cases_in("dev")


@pytest.mark.parametrize(
    "attrs, says",
    [
        ({"size": "64x64"}, "size 64x64 is not [H, W]"),
        ({"size": [64, -1]}, "size [64, -1] is not [H, W]"),
        ({"cases": ["../x"]}, "cases is not a list of LiTS case ids"),
        ({"cases": "0,1"}, "cases is not a list of LiTS case ids"),
        ({"case_slices": [24]}, "case_slices is not a mapping"),
        ({"case_slices": {"0": "24"}}, "case_slices is not a mapping"),
        ({"splits": {"train": "0"}}, "splits is not a mapping of split names to lists of case ids"),
        ({"splits": [["0"]]}, "splits is not a mapping"),
    ],
)
def test_tampered_root_attrs_are_one_line(tmp_path, store_path, attrs, says):
    """Before: a zarr.json with attributes of other types failed deep in a reader (TypeError, KeyError)."""
    import json
    import shutil

    from liverseg.core.errors import StoreError

    store = tmp_path / "s.zarr"
    shutil.copytree(store_path, store)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"].update(attrs)
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=re.escape(f"{store}: zarr.json: {says}")):
        SliceStore(str(store))


def test_tampered_case_attrs_are_a_verify_problem(tmp_path, store_path):
    import json
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(store_path, store)
    case = SliceStore(str(store)).cases[0]
    meta = json.loads((store / "cases" / case / "zarr.json").read_text())
    del meta["attributes"]["image_sha256"]
    (store / "cases" / case / "zarr.json").write_text(json.dumps(meta))
    problems = SliceStore(str(store)).verify()
    assert list(problems) == [case] and "image_sha256/mask_sha256 are not sha256 digests" in problems[case]
