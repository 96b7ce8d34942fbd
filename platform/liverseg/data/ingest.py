"""Ingest: LiTS NIfTI folder -> Zarr v3 slice store, parallel over volumes, incremental, atomic per case.

A case is written into a hidden temporary group and renamed into `cases/<id>` only when complete, so
an interrupted ingest (Ctrl-C, SIGKILL) leaves no half-written case; the next run finishes the job.
A new geometry (`size`) rebuilds the whole store beside the old one and swaps only when complete.
Nothing is removed that the user did not name: a raw folder without cases is an error, and cases
whose files vanished stay in the store unless `prune` is given. Workers die with their parent. What
may be deleted, swapped or locked in the store's folder is `store_folder`'s.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zarr

from liverseg.core.errors import InputError, StoreError
from liverseg.core.files import sha256_file
from liverseg.core.limits import MAX_SLICES
from liverseg.data import store_folder
from liverseg.data.lits import CasePaths, case_order, check_slices, discover, read_case
from liverseg.data.resize import resize_slices
from liverseg.data.store import SliceStore, array_sha256, existing_attrs, root_attrs, split_cases, write_array
from liverseg.data.store_folder import NEW_SUFFIX, OLD_SUFFIX, TMP_PREFIX

if TYPE_CHECKING:  # spawned workers import this module: keep pydantic and tqdm out of their start-up
    from liverseg.core.config import IngestConfig

PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class IngestReport:
    store: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # case id (or file) -> one-line reason
    kept: list[str] = field(default_factory=list)  # stored cases whose files vanished (no --prune)
    pruned: list[str] = field(default_factory=list)  # stored cases removed because their files vanished
    splits: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def _die_with_parent(parent_pid: int) -> None:
    """Pool initializer: a worker must never outlive (and keep writing for) a killed ingest.

    The kernel sends SIGKILL when the parent dies (Linux prctl); a watchdog thread covers other systems
    and the window before prctl took effect (the parent may already be gone).
    """
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the watchdog alone
        pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def ingest_case(case: CasePaths, cases_dir: str, size: tuple[int, int], shard_slices: int) -> tuple[str, int]:
    """Read, validate, resize and atomically write one case. Returns (case id, slices)."""
    vol = read_case(case)
    check_slices(vol.image, case.volume.name, MAX_SLICES)  # each slice is resized: a few bytes could ask for GiBs
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
            write_array(group, "image", image, shard_slices)
            write_array(group, "mask", mask, shard_slices)
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
    with ProcessPoolExecutor(
        max_workers=min(cfg.workers, len(todo)),
        mp_context=ctx,
        initializer=_die_with_parent,  # a killed ingest leaves no worker writing
        initargs=(os.getpid(),),
    ) as pool:
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


def ingest(
    raw: str | Path, store: str | Path, cfg: IngestConfig, progress: bool = True, prune: bool = False
) -> IngestReport:
    """Convert every valid case of a LiTS folder into the store; bad cases are reported, not fatal.

    Raises InputError, with the store untouched, when the folder holds no LiTS case, or when a new
    `size` would drop cases whose files vanished and `prune` is not given. `prune`: remove stored cases
    whose files left the raw folder (kept otherwise). The store must be a local path (shards are
    renamed into place); `publish_store` uploads it after.
    """
    if "://" in str(store):
        raise StoreError(
            f"{store}: ingest writes a local store (cases are renamed into place); "
            f"ingest to a folder, then `liverseg publish --store FOLDER --to {store}`"
        )
    store_path = store_folder.checked_store(Path(raw), Path(store))
    cases, errors = discover(raw)
    if not cases:
        raise InputError(
            f"{raw}: no LiTS cases (volume-N.nii[.gz] with segmentation-N.nii[.gz]) found; {store} left untouched"
        )
    with store_folder.store_lock(store_path, store):
        store_folder.recover_swap(store_path)
        old = existing_attrs(store_path)
        if old.get("cases") and old.get("size") != list(cfg.size):
            return _rebuild(raw, store_path, cases, errors, cfg, progress, prune, old)
        return _update(store_path, cases, errors, cfg, progress, prune)


def _rebuild(raw, store_path: Path, cases, errors, cfg: IngestConfig, progress: bool, prune: bool, old: dict):
    """A new geometry: build a complete store beside the old one and swap; the old one serves until then."""
    vanished = sorted(set(old["cases"]) - {c.case_id for c in cases}, key=case_order)
    if vanished and not prune:
        raise InputError(
            f"{store_path}: size {old.get('size')} -> {list(cfg.size)} rebuilds every case, but case(s) "
            f"{', '.join(vanished)} have no files in {raw}; give --prune to drop them ({store_path} left untouched)"
        )
    new = store_path.with_name(f".{store_path.name}{NEW_SUFFIX}{uuid.uuid4().hex[:8]}")
    report = _update(new, cases, errors, cfg, progress, prune=True)
    report.store, report.pruned = str(store_path), vanished
    lost = sorted(set(report.failed) & set(old["cases"]), key=case_order)
    if lost:  # the old store still holds these cases: keep it rather than lose them
        store_folder.remove_store_folder(new)
        report.failed["store"] = (
            f"{store_path}: size change abandoned, old store kept (size {old.get('size')}): "
            f"case(s) {', '.join(lost)} could not be rebuilt"
        )
        report.written, report.pruned, report.splits = [], [], dict(old.get("splits", {}))
        return report
    trash = store_path.with_name(f".{store_path.name}{OLD_SUFFIX}{uuid.uuid4().hex[:8]}")
    os.rename(store_path, trash)
    os.rename(new, store_path)
    if not store_folder.remove_store_folder(trash):  # something was added to the store during the rebuild
        report.failed["store"] = f"{trash}: the old store holds files ingest did not write; kept, remove it yourself"
    return report


def _update(store_path: Path, cases, errors, cfg: IngestConfig, progress: bool, prune: bool) -> IngestReport:
    """Ingest into a store of this geometry (or a new one): changed and new cases only."""
    report = IngestReport(store=str(store_path))
    for line in errors:
        report.failed[line.split(":")[0]] = line
    root = store_folder.open_root(store_path)
    slices: dict[str, int] = dict(root.attrs.get("case_slices", {}))
    todo = _plan(cases, root, cfg, report)
    done: dict[str, int] = {cid: slices[cid] for cid in report.skipped}
    if todo:
        done |= _convert(todo, store_path / "cases", cfg, progress, report)
    _reconcile(store_path / "cases", {c.case_id for c in cases}, slices, done, report, prune)
    ordered = sorted(done, key=case_order)
    report.splits = split_cases(ordered, cfg.split.fractions, cfg.split.seed)
    report.written.sort(key=case_order)
    root.attrs.update(
        root_attrs(cfg.size, {c: done[c] for c in ordered}, report.splits, cfg.split.seed, cfg.split.fractions)
    )
    return report


def _reconcile(cases_dir: Path, present: set[str], slices: dict[str, int], done: dict[str, int], report, prune):
    """Stored cases not (re)written this run: vanished sources are kept unless pruned; a case whose new
    source failed keeps its stored version (same geometry), so one bad file never loses a good case."""
    for cid in sorted(set(slices) - set(done), key=case_order):
        if cid not in present and prune:
            shutil.rmtree(cases_dir / cid, ignore_errors=True)
            report.pruned.append(cid)
        elif (cases_dir / cid / "zarr.json").exists():
            done[cid] = slices[cid]
            if cid not in present:
                report.kept.append(cid)


def verify(store: str) -> dict[str, str]:
    """Check the store's listing and every case (shape, dtype, hashes); {case or "store": problem}."""
    return SliceStore(store).verify()
