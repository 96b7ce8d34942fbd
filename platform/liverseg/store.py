"""The Zarr v3 slice store: the contract between ingest and every later stage.

Layout (format "liverseg-slices", version 1)::

    <store>/zarr.json                 root attrs: format, format_version, size [H, W], cases, splits,
                                      case_slices {id: Z}, orientation "RAS", axes ["z","y","x"], labels
    <store>/cases/<id>/image          (Z, H, W) int16 HU, chunk = 1 slice, shard = `shard_slices` slices
    <store>/cases/<id>/mask           (Z, H, W) uint8 {0 background, 1 liver, 2 tumour}
    group attrs                       shape, spacing_mm, affine, canonical_affine, source sha256s,
                                      image_sha256/mask_sha256 of the stored arrays (for --verify)

Reads work from a local path or any fsspec URL (s3://bucket/store.zarr).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import zarr

from liverseg.errors import StoreError

FORMAT = "liverseg-slices"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


def array_sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def split_cases(case_ids: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """Assign whole volumes to train/val/test, deterministically for a seed.

    Cases are ranked by a seeded hash of their id (stable when cases are added), then cut by exact
    counts; with 3+ cases every split with a non-zero fraction gets at least one.
    """
    ranked = sorted(case_ids, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    n = len(ranked)
    counts = [int(round(f * n)) for f in fractions]
    if n >= 3:
        for i, f in enumerate(fractions):
            if f > 0 and counts[i] == 0:
                counts[i] = 1
                counts[int(np.argmax(counts))] -= 1
    counts[0] = n - counts[1] - counts[2]
    bounds = np.cumsum([0] + counts)
    return {name: sorted(ranked[bounds[i] : bounds[i + 1]], key=lambda c: (len(c), c)) for i, name in enumerate(SPLITS)}


class SliceStore:
    """Read access to a slice store: cases per split, slices by (case, index), whole volumes."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = str(url)
        try:
            self.root = zarr.open_group(self.url, mode="r", storage_options=storage_options)
        except Exception as e:
            raise StoreError(f"{self.url}: cannot open slice store ({type(e).__name__}: {e})") from None
        attrs = dict(self.root.attrs)
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{self.url}: not a {FORMAT} store (format={attrs.get('format')!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{self.url}: format_version {attrs.get('format_version')} != {FORMAT_VERSION}")
        self.attrs = attrs
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._case_attrs: dict[str, dict[str, Any]] = {}

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.attrs["size"]
        return int(h), int(w)

    @property
    def cases(self) -> list[str]:
        return list(self.attrs["cases"])

    @property
    def splits(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.attrs["splits"].items()}

    def cases_in(self, split: str) -> list[str]:
        if split not in self.attrs["splits"]:
            raise StoreError(f"{self.url}: unknown split '{split}'; valid: {', '.join(self.attrs['splits'])}")
        return list(self.attrs["splits"][split])

    def num_slices(self, case: str) -> int:
        return int(self.attrs["case_slices"][case])

    def case_attrs(self, case: str) -> dict[str, Any]:
        if case not in self._case_attrs:
            self._case_attrs[case] = dict(self._group(case).attrs)
        return self._case_attrs[case]

    def _group(self, case: str) -> zarr.Group:
        if case not in self.attrs["cases"]:
            raise StoreError(f"{self.url}: no case '{case}'")
        try:
            return self.root[f"cases/{case}"]
        except Exception as e:
            raise StoreError(f"{self.url}: case {case}: group unreadable ({type(e).__name__}: {e})") from None

    def _array(self, case: str, name: str) -> zarr.Array:
        key = (case, name)
        if key not in self._arrays:
            self._arrays[key] = self._group(case)[name]
        return self._arrays[key]

    def _read(self, case: str, name: str, sel: Any) -> np.ndarray:
        try:
            return np.asarray(self._array(case, name)[sel])
        except StoreError:
            raise
        except Exception as e:  # a truncated or corrupted shard surfaces as a codec error
            raise StoreError(f"{self.url}: case {case}: cannot read {name} ({type(e).__name__}: {e})") from None

    def slices(self, case: str, indices: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Slices of one case: (image (n, H, W) int16 HU, mask (n, H, W) uint8)."""
        idx = np.asarray(indices, dtype=np.int64)
        return self._read(case, "image", idx), self._read(case, "mask", idx)

    def volume(self, case: str) -> tuple[np.ndarray, np.ndarray]:
        """A whole case: (image (Z, H, W) int16 HU, mask (Z, H, W) uint8)."""
        return self._read(case, "image", slice(None)), self._read(case, "mask", slice(None))

    def verify(self) -> dict[str, str]:
        """Re-hash every case against the hashes recorded at ingest; returns {case: problem}."""
        problems = {}
        for case in self.cases:
            try:
                img, msk = self.volume(case)
                attrs = self.case_attrs(case)
                if array_sha256(img) != attrs["image_sha256"]:
                    problems[case] = "image data does not match its recorded sha256"
                elif array_sha256(msk) != attrs["mask_sha256"]:
                    problems[case] = "mask data does not match its recorded sha256"
            except StoreError as e:
                problems[case] = str(e)
        return problems
