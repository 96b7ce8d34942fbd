"""Ingest: LiTS NIfTI folder -> Zarr v3 slice store, parallel over volumes, incremental, atomic per case.

A case is written into a hidden temporary group and renamed into `cases/<id>` only when complete, so
an interrupted ingest (Ctrl-C, SIGKILL) leaves no half-written case; the next run finishes the job.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from liverseg import __version__
from liverseg.lits import CasePaths, InputError, discover, read_case, sha256_file
from liverseg.resize import resize_slices
from liverseg.store import FORMAT, FORMAT_VERSION, SliceStore, StoreError, array_sha256, split_cases

if TYPE_CHECKING:  # spawned workers import this module: keep pydantic and tqdm out of their start-up
    from liverseg.config import IngestConfig

TMP_PREFIX = ".tmp-"
COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")  # ~3x on CT, fast to decode


@dataclass
class IngestReport:
    store: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # case id (or file) -> one-line reason
    splits: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def _write_array(group: zarr.Group, name: str, data: np.ndarray, shard_slices: int) -> None:
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


def ingest_case(case: CasePaths, cases_dir: str, size: tuple[int, int], shard_slices: int) -> tuple[str, int]:
    """Read, validate, resize and atomically write one case. Returns (case id, slices)."""
    vol = read_case(case)
    image = resize_slices(vol.image, size, is_mask=False)
    mask = resize_slices(vol.mask, size, is_mask=True)
    final = Path(cases_dir) / case.case_id
    tmp = Path(cases_dir) / f"{TMP_PREFIX}{case.case_id}-{uuid.uuid4().hex[:8]}"
    # Encode a shard's chunks in one batch on this thread: zarr's default (batches of 1 through a
    # thread pool) costs ~1 ms per chunk, 10x the Blosc encoding itself; the pool runs one case per core.
    batched = {"codec_pipeline.batch_size": max(shard_slices, 1), "threading.max_workers": 1}
    try:
        with zarr.config.set(batched):
            group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            _write_array(group, "image", image, shard_slices)
            _write_array(group, "mask", mask, shard_slices)
        zoom = [vol.image.shape[1] / size[0], vol.image.shape[2] / size[1]]
        group.attrs.update(
            {
                "case_id": case.case_id,
                "source_volume": case.volume.name,
                "source_segmentation": case.segmentation.name,
                "volume_sha256": vol.sha256,
                "segmentation_sha256": vol.mask_sha256,
                "size": list(size),
                "original_shape": list(vol.shape),
                "canonical_shape_zyx": list(vol.image.shape),
                "spacing_mm": list(vol.spacing),
                "stored_spacing_mm_zyx": [vol.spacing[2], vol.spacing[1] * zoom[0], vol.spacing[0] * zoom[1]],
                "affine": vol.affine.tolist(),
                "canonical_affine": vol.canonical_affine.tolist(),
                "liver_voxels": int((mask >= 1).sum()),
                "image_sha256": array_sha256(image),
                "mask_sha256": array_sha256(mask),
            }
        )
        trash = None
        if final.exists():
            trash = final.with_name(f"{TMP_PREFIX}old-{case.case_id}-{uuid.uuid4().hex[:8]}")
            os.rename(final, trash)
        os.rename(tmp, final)
        if trash:
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return case.case_id, int(image.shape[0])


def _is_current(root: zarr.Group, case: CasePaths, size: tuple[int, int]) -> bool:
    """True when the stored case was built from these exact files at this size."""
    try:
        attrs = root[f"cases/{case.case_id}"].attrs
    except (KeyError, FileNotFoundError):
        return False
    return (
        attrs.get("size") == list(size)
        and attrs.get("volume_sha256") == sha256_file(case.volume)
        and case.segmentation is not None
        and attrs.get("segmentation_sha256") == sha256_file(case.segmentation)
    )


def _open_root(store_path: Path) -> zarr.Group:
    """Open (or create) the store's root group, refusing another format; clear interrupted leftovers."""
    root = zarr.open_group(str(store_path), mode="a", zarr_format=3)
    if root.attrs.get("format", FORMAT) != FORMAT:
        raise StoreError(f"{store_path}: exists and is not a {FORMAT} store")
    root.require_group("cases")
    for leftover in (store_path / "cases").glob(f"{TMP_PREFIX}*"):  # from an interrupted run
        shutil.rmtree(leftover, ignore_errors=True)
    return root


def _plan(cases: list[CasePaths], root: zarr.Group, cfg: IngestConfig, report: IngestReport) -> list[CasePaths]:
    """The cases to (re)write; unchanged ones go to report.skipped, unpaired volumes to report.failed."""
    slices = root.attrs.get("case_slices", {})
    todo = []
    for case in cases:
        if case.segmentation is None:
            report.failed[case.case_id] = f"{case.volume.name}: missing segmentation-{case.case_id}.nii[.gz]"
        elif case.case_id in slices and _is_current(root, case, cfg.size):
            report.skipped.append(case.case_id)
        else:
            todo.append(case)
    return todo


def _convert(todo: list[CasePaths], cases_dir: Path, cfg: IngestConfig, progress: bool, report: IngestReport):
    """Write the cases in worker processes; {case id: slices} of those written (failures to report)."""
    from tqdm import tqdm

    done: dict[str, int] = {}
    ctx = mp.get_context("spawn")  # fork after torch/zarr threads exist can deadlock
    with ProcessPoolExecutor(max_workers=min(cfg.workers, len(todo)), mp_context=ctx) as pool:
        futures = {pool.submit(ingest_case, c, str(cases_dir), cfg.size, cfg.shard_slices): c for c in todo}
        bar = tqdm(total=len(todo), desc="ingest", unit="vol", disable=not progress, file=sys.stderr)
        try:
            for fut in as_completed(futures):
                case = futures[fut]
                try:
                    cid, z = fut.result()
                    done[cid] = z
                    report.written.append(cid)
                except InputError as e:
                    report.failed[case.case_id] = str(e)
                except Exception as e:  # one bad volume never loses the good ones
                    report.failed[case.case_id] = f"{case.volume.name}: {type(e).__name__}: {e}"
                bar.update()
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            bar.close()
    return done


def _root_attrs(cfg: IngestConfig, case_slices: dict[str, int], splits: dict[str, list[str]]) -> dict:
    """The store's description: format, size, cases and their slices, splits, orientation, units, labels."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "size": list(cfg.size),
        "cases": list(case_slices),
        "case_slices": case_slices,
        "splits": splits,
        "split_seed": cfg.split.seed,
        "split_fractions": list(cfg.split.fractions),
        "orientation": "RAS",
        "axes": ["z", "y", "x"],
        "units": "HU",
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "liverseg_version": __version__,
    }


def ingest(raw: str | Path, store: str | Path, cfg: IngestConfig, progress: bool = True) -> IngestReport:
    """Convert every valid case of a LiTS folder into the store; bad cases are reported, not fatal.

    The store must be a local path (shards are renamed into place); `publish_store` uploads it after.
    """
    if "://" in str(store):
        raise StoreError(
            f"{store}: ingest writes a local store (cases are renamed into place); "
            f"ingest to a folder, then `liverseg publish --store FOLDER --to {store}`"
        )
    store_path = Path(store)
    report = IngestReport(store=str(store_path))
    cases, errors = discover(raw)
    for line in errors:
        report.failed[line.split(":")[0]] = line
    root = _open_root(store_path)
    slices: dict[str, int] = dict(root.attrs.get("case_slices", {}))
    todo = _plan(cases, root, cfg, report)
    done: dict[str, int] = {cid: slices[cid] for cid in report.skipped}
    if todo:
        done |= _convert(todo, store_path / "cases", cfg, progress, report)
    for stale in set(slices) - {c.case_id for c in cases}:  # source removed: the store follows the raw folder
        shutil.rmtree(store_path / "cases" / stale, ignore_errors=True)
    ordered = sorted(done, key=lambda c: (len(c), c))
    report.splits = split_cases(ordered, cfg.split.fractions, cfg.split.seed)
    report.written.sort(key=lambda c: (len(c), c))
    root.attrs.update(_root_attrs(cfg, {c: done[c] for c in ordered}, report.splits))
    return report


def verify(store: str) -> dict[str, str]:
    """Check every case of a store against its recorded hashes; {case: problem} (empty when sound)."""
    return SliceStore(store).verify()
