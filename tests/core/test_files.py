"""Atomic writes: whole files only, with the permissions an ordinary write would give."""

import os
import stat

import pytest

from liverseg.core.files import atomic_write_bytes, atomic_write_json


def test_written_file_follows_umask_and_leaves_no_temp(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a" / "mask.nii.gz", b"data")
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "mask.nii.gz").read_bytes() == b"data"
    assert stat.S_IMODE((tmp_path / "a" / "mask.nii.gz").stat().st_mode) == 0o644
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["mask.nii.gz"]


def test_failed_write_keeps_the_old_file(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"dice": 0.9})
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "m.json", "not bytes")  # fails after the temporary file exists
    assert (tmp_path / "m.json").read_text() == '{\n  "dice": 0.9\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
