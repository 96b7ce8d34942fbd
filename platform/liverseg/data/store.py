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
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from liverseg import __version__
from liverseg.core.errors import StoreError, one_line
from liverseg.data.lits import CASE_ID, case_order
from liverseg.data.published import missing_objects, resolve, store_name

FORMAT = "liverseg-slices"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
ARRAYS = {"image": np.int16, "mask": np.uint8}  # per case, (Z, H, W)
COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")  # ~3x on CT, fast to decode


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
    return {name: sorted(ranked[bounds[i] : bounds[i + 1]], key=case_order) for i, name in enumerate(SPLITS)}


# ---------------------------------------------------------------- writing (ingest)
def root_attrs(
    size: tuple[int, int],
    case_slices: dict[str, int],
    splits: dict[str, list[str]],
    split_seed: int,
    split_fractions: tuple[float, float, float],
) -> dict[str, Any]:
    """The store's description: format, size, cases and their slices, splits, orientation, units, labels."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "size": list(size),
        "cases": list(case_slices),
        "case_slices": case_slices,
        "splits": splits,
        "split_seed": split_seed,
        "split_fractions": list(split_fractions),
        "orientation": "RAS",
        "axes": ["z", "y", "x"],
        "units": "HU",
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "liverseg_version": __version__,
    }


def existing_attrs(store_path: Path) -> dict:
    """Root attributes of an existing store ({} when there is none); refuses a store of another format."""
    if not (store_path / "zarr.json").exists():
        return {}
    attrs = dict(zarr.open_group(str(store_path), mode="r", zarr_format=3).attrs)
    if attrs.get("format", FORMAT) != FORMAT:
        raise StoreError(f"{store_path}: exists and is not a {FORMAT} store")
    return attrs


def write_array(group: zarr.Group, name: str, data: np.ndarray, shard_slices: int) -> None:
    """Write a (Z, H, W) case array: one slice per chunk, `shard_slices` slices per shard file."""
    z, h, w = data.shape
    group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=(1, h, w),
        shards=(min(shard_slices, z), h, w),
        compressors=COMPRESSOR,
        dimension_names=("z", "y", "x"),
        fill_value=0,
    )[:] = data


# ---------------------------------------------------------------- reading
def attrs_problem(attrs: dict[str, Any]) -> str | None:
    """What makes root attributes unreadable (wrong types, ids that are not LiTS ids), or None: checked
    when a store is opened, so that a tampered `zarr.json` is one line, not an error deep in a reader."""
    size, cases, slices, splits = (attrs.get(k) for k in ("size", "cases", "case_slices", "splits"))
    if not (isinstance(size, list) and len(size) == 2 and all(_count(x) and x > 0 for x in size)):
        return f"size {str(size)[:40]} is not [H, W]"
    if not (isinstance(cases, list) and all(_is_id(c) for c in cases)):
        return "cases is not a list of LiTS case ids"
    if not (isinstance(slices, dict) and all(_count(z) for z in slices.values())):
        return "case_slices is not a mapping of case ids to slice counts"
    ids = [c for v in splits.values() if isinstance(v, list) for c in v] if isinstance(splits, dict) else None
    if ids is None or not all(isinstance(v, list) for v in splits.values()) or not all(_is_id(c) for c in ids):
        return "splits is not a mapping of split names to lists of case ids"
    return None


def _is_id(c: Any) -> bool:
    return isinstance(c, str) and CASE_ID.fullmatch(c) is not None


def _mm(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < float("inf")


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class SliceStore:
    """Read access to a slice store: cases per split, slices by (case, index), whole volumes.

    `url`: a local path, a Zarr URL, or a published store's URL (its current version, resolved once: every
    later read is of that version, whatever is published meanwhile) or `<url>/versions/<VID>` (that one).
    `version` is the version read (None for a plain store), `pinned_url` the URL of exactly that version:
    hand it to other processes (Ray workers) so that they read the same one."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url, self._options = str(url), storage_options
        self.name = store_name(self.url)  # `lits.zarr`, also for a pinned version's URL
        try:
            target, self.version, self.pinned_url = resolve(self.url, storage_options)
            options = storage_options if isinstance(target, str) else None
            self.root = zarr.open_group(target, mode="r", storage_options=options)
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"{self.url}: cannot open slice store ({one_line(e)})") from None
        attrs = dict(self.root.attrs)
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{self.url}: not a {FORMAT} store (format={str(attrs.get('format'))[:40]!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{self.url}: format_version {attrs.get('format_version')!r} != {FORMAT_VERSION}")
        problem = attrs_problem(attrs)
        if problem:
            raise StoreError(f"{self.url}: zarr.json: {problem}")
        self.attrs, self._arrays, self._case_attrs = attrs, {}, {}  # arrays by (case, name), attrs by case

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
        if case not in self.attrs["case_slices"]:
            raise StoreError(f"{self.url}: case {case}: no slice count in case_slices")
        return int(self.attrs["case_slices"][case])

    def case_attrs(self, case: str) -> dict[str, Any]:
        """A case group's attributes; those readers use are checked (StoreError naming the case)."""
        if case not in self._case_attrs:
            attrs = dict(self._group(case).attrs)
            digests = [attrs.get(k) for k in ("image_sha256", "mask_sha256")]
            spacing = attrs.get("stored_spacing_mm_zyx")
            if not all(isinstance(d, str) and len(d) == 64 for d in digests):
                raise StoreError(f"{self.url}: case {case}: image_sha256/mask_sha256 are not sha256 digests")
            if not (isinstance(spacing, list) and len(spacing) == 3 and all(_mm(x) for x in spacing)):
                raise StoreError(f"{self.url}: case {case}: stored_spacing_mm_zyx is not 3 positive sizes")
            self._case_attrs[case] = attrs
        return self._case_attrs[case]

    def _group(self, case: str) -> zarr.Group:
        if case not in self.attrs["cases"]:
            raise StoreError(f"{self.url}: no case '{case}'")
        try:
            return self.root[f"cases/{case}"]
        except Exception as e:
            raise StoreError(f"{self.url}: case {case}: group unreadable ({type(e).__name__}: {e})") from None

    def _array(self, case: str, name: str) -> zarr.Array:
        """A case's array, refused when its slices are not of the store's declared size (never served)."""
        key = (case, name)
        if key not in self._arrays:
            group = self._group(case)
            try:
                arr = group[name]
            except Exception as e:  # absent (KeyError), or its zarr.json unreadable
                raise StoreError(f"{self.url}: case {case}: no readable '{name}' array ({one_line(e)})") from None
            if tuple(arr.shape[1:]) != self.size:
                raise StoreError(
                    f"{self.url}: case {case}: {name} slices are {tuple(arr.shape[1:])}, the store declares {self.size}"
                )
            self._arrays[key] = arr
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
        """Check the listing and every case; returns {case (or "store"): problem}, empty when sound.

        Listing: the splits partition `cases` and `case_slices` has exactly those cases. Each case:
        image (Z, H, W) int16 and mask (Z, H, W) uint8 with Z its `case_slices` and (H, W) the root
        `size`, group `size` equal to the root's, data equal to the sha256 recorded at ingest.
        """
        problems = {}
        listing = self._listing_problem() or self._objects_problem()
        if listing:
            problems["store"] = listing
        for case in self.cases:
            try:
                problem = self._case_problem(case)
            except StoreError as e:
                problem = str(e)
            if problem:
                problems[case] = problem
        return problems

    def _listing_problem(self) -> str | None:
        cases, counted = set(self.cases), set(self.attrs.get("case_slices", {}))
        in_splits = [c for split in self.attrs.get("splits", {}).values() for c in split]
        if len(in_splits) != len(set(in_splits)) or set(in_splits) != cases:
            return f"splits list {len(in_splits)} case(s), not a partition of the {len(cases)} stored cases"
        if counted != cases:
            return f"case_slices covers {len(counted)} case(s), the store lists {len(cases)}"
        return None

    def _objects_problem(self) -> str | None:
        """A published version's objects that are gone or of another size than its manifest says."""
        missing = missing_objects(self.pinned_url, self._options) if self.version else []
        if missing:
            return f"version {self.version}: {len(missing)} object(s) missing or changed: {', '.join(missing[:3])}"
        return None

    def _case_problem(self, case: str) -> str | None:
        if self.case_attrs(case).get("size") != list(self.size):
            return (
                f"case {case}: built at size {self.case_attrs(case).get('size')}, the store declares {list(self.size)}"
            )
        z = self.attrs.get("case_slices", {}).get(case)
        if z is None:
            return f"case {case}: no slice count in case_slices"
        expect = (int(z), *self.size)
        for name, dtype in ARRAYS.items():
            arr = self._array(case, name)
            if tuple(arr.shape) != expect or arr.dtype != dtype:
                return f"case {case}: {name} is {tuple(arr.shape)} {arr.dtype}, the store declares {expect} {np.dtype(dtype)}"
        img, msk = self.volume(case)
        if array_sha256(img) != self.case_attrs(case)["image_sha256"]:
            return "image data does not match its recorded sha256"
        if array_sha256(msk) != self.case_attrs(case)["mask_sha256"]:
            return "mask data does not match its recorded sha256"
        return None
