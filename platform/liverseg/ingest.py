"""Ingest: LiTS NIfTI folder -> Zarr v3 slice store, parallel over volumes, incremental, atomic per case.

A case is written into a hidden temporary group and renamed into `cases/<id>` only when complete, so
an interrupted ingest (Ctrl-C, SIGKILL) leaves no half-written case; the next run finishes the job.
A new geometry (`size`) rebuilds the whole store beside the old one and swaps only when complete.
Nothing is removed that the user did not name: a raw folder without cases is an error, and cases
whose files vanished stay in the store unless `prune` is given. Workers die with their parent.
Since a rebuild swaps and deletes the store folder whole, the store may hold only its own files and
never the raw folder (nor lie in it); one ingest per store runs at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing as mp
import os
import re
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

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from liverseg import __version__
from liverseg.config import MAX_SLICES
from liverseg.lits import CasePaths, InputError, check_slices, discover, read_case, sha256_file
from liverseg.resize import resize_slices
from liverseg.store import FORMAT, FORMAT_VERSION, SliceStore, StoreError, array_sha256, split_cases

if TYPE_CHECKING:  # spawned workers import this module: keep pydantic and tqdm out of their start-up
    from liverseg.config import IngestConfig

TMP_PREFIX = ".tmp-"
NEW_SUFFIX, OLD_SUFFIX = ".new-", ".old-"  # sibling stores of a geometry change: `.<name>.new-<hex>`
PR_SET_PDEATHSIG = 1  # linux/prctl.h
STORE_ENTRIES = frozenset({"zarr.json", "cases"})  # all a store's folder holds: the rest is not ours to delete
CASE_ID = re.compile(r"\w+")  # LiTS ids (lits.NAME): never a path, so a case folder stays inside cases/
COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")  # ~3x on CT, fast to decode


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
    odd = [c for c in root.attrs.get("case_slices", {}) if not CASE_ID.fullmatch(c)]
    if odd:  # a case id is joined to cases/ to prune it: one like "../x" would reach outside the store
        raise StoreError(f"{store_path}: case id {odd[0]!r} in zarr.json is not a LiTS id (not written by ingest)")
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


def case_order(case_id: str) -> tuple[int, str]:
    """LiTS ids in numeric order: 2 before 10."""
    return len(case_id), case_id


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
    store_path = _checked_store(Path(raw), Path(store))
    cases, errors = discover(raw)
    if not cases:
        raise InputError(
            f"{raw}: no LiTS cases (volume-N.nii[.gz] with segmentation-N.nii[.gz]) found; {store} left untouched"
        )
    with _store_lock(store_path, store):
        _recover_swap(store_path)
        old = _existing_attrs(store_path)
        if old.get("cases") and old.get("size") != list(cfg.size):
            return _rebuild(raw, store_path, cases, errors, cfg, progress, prune, old)
        return _update(store_path, cases, errors, cfg, progress, prune)


@contextlib.contextmanager
def _store_lock(store_path: Path, store: str | Path):
    """One ingest per store at a time; a second is refused: its clean-up of interrupted runs would delete
    the first one's half-built copy, and their swaps would interleave. The lock file (`.NAME.lock`
    beside the store) goes at the end; a lock found unlinked after locking is retried (another run
    just finished), so two runs never hold two files of one name.
    """
    lock = store_path.with_name(f".{store_path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{store}: another ingest is writing this store; run again when it has ended") from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held: a waiting run then sees an unlinked file, retries
        os.close(fd)


def _checked_store(raw: Path, store: Path) -> Path:
    """The store's resolved path, refused before anything is written when a rebuild's swap of the store
    folder, or a prune, could delete what is not the store's: the raw folder (the store is it, holds it
    or lies in it), the current folder, or files of a folder that is not a store. Paths as given in errors.
    """
    raw_r, store_r, cwd = raw.resolve(), store.resolve(), Path.cwd().resolve()
    for relation, hit in (
        ("is", store_r == raw_r),
        ("holds", store_r in raw_r.parents),
        ("lies inside", raw_r in store_r.parents),
    ):
        if hit:
            raise StoreError(f"{store}: the store {relation} the raw folder {raw}; give a store outside it")
    if store_r == cwd or store_r in cwd.parents:
        raise StoreError(f"{store}: is the current folder or holds it; give the store's path from outside it")
    if store_r.exists() and not store_r.is_dir():
        raise StoreError(f"{store}: exists and is not a folder")
    foreign = _foreign_entries(store_r)
    if foreign:
        raise StoreError(
            f"{store}: holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, not a slice store's; "
            "give a new or empty folder, or a store written by `liverseg ingest`"
        )
    return store_r


def check_metrics_out(out: Path, raw: str | Path, store: str | Path) -> None:
    """`--out` (the counts' JSON file) is refused where writing it would replace a raw file, put a file
    that is not the store's into the store (refused on the next run), or replace a folder."""
    out_r = out.resolve()
    for folder, what in ((Path(raw), "raw folder"), (Path(store), "store")):
        if folder.resolve() == out_r or folder.resolve() in out_r.parents:
            raise StoreError(f"{out}: is or lies inside the {what} {folder}; write the counts elsewhere")
    if out_r.is_dir():
        raise StoreError(f"{out}: is a folder; give a .json file name")


def _foreign_entries(folder: Path) -> list[str]:
    """What a store folder holds that ingest did not write (relative names, sorted); [] for none/absent.

    Ours: `zarr.json` and `cases/`, which holds `zarr.json`, case groups and hidden temporary groups.
    """
    if not folder.is_dir():
        return []
    foreign = [p.name for p in folder.iterdir() if p.name not in STORE_ENTRIES]
    cases = folder / "cases"
    if cases.is_dir():
        foreign += [
            f"cases/{p.name}"
            for p in cases.iterdir()
            if p.name != "zarr.json"
            and not (p.is_dir() and (CASE_ID.fullmatch(p.name) or p.name.startswith(TMP_PREFIX)))
        ]
    elif cases.exists():
        foreign.append("cases")
    return sorted(foreign)


def _remove_store_folder(folder: Path) -> bool:
    """Delete a store folder that ingest made (a rebuild's old or half-built copy); one holding anything
    else is kept (False): deleting it would lose files nobody asked ingest to touch."""
    if _foreign_entries(folder):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def _existing_attrs(store_path: Path) -> dict:
    """Root attributes of an existing store ({} when there is none); refuses a store of another format."""
    if not (store_path / "zarr.json").exists():
        return {}
    attrs = dict(zarr.open_group(str(store_path), mode="r", zarr_format=3).attrs)
    if attrs.get("format", FORMAT) != FORMAT:
        raise StoreError(f"{store_path}: exists and is not a {FORMAT} store")
    return attrs


def _siblings(store_path: Path, suffix: str) -> list[Path]:
    return sorted(store_path.parent.glob(f".{store_path.name}{suffix}*"))


def _recover_swap(store_path: Path) -> None:
    """Undo what an interrupted geometry change left: its half-built store, or the moved-away old one."""
    for half_built in _siblings(store_path, NEW_SUFFIX):
        _remove_store_folder(half_built)
    olds = _siblings(store_path, OLD_SUFFIX)
    if olds and not store_path.exists():  # killed between the two renames of the swap
        os.rename(olds.pop(), store_path)
    for old in olds:
        _remove_store_folder(old)


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
        _remove_store_folder(new)
        report.failed["store"] = (
            f"{store_path}: size change abandoned, old store kept (size {old.get('size')}): "
            f"case(s) {', '.join(lost)} could not be rebuilt"
        )
        report.written, report.pruned, report.splits = [], [], dict(old.get("splits", {}))
        return report
    trash = store_path.with_name(f".{store_path.name}{OLD_SUFFIX}{uuid.uuid4().hex[:8]}")
    os.rename(store_path, trash)
    os.rename(new, store_path)
    if not _remove_store_folder(trash):  # something was added to the store during the rebuild
        report.failed["store"] = f"{trash}: the old store holds files ingest did not write; kept, remove it yourself"
    return report


def _update(store_path: Path, cases, errors, cfg: IngestConfig, progress: bool, prune: bool) -> IngestReport:
    """Ingest into a store of this geometry (or a new one): changed and new cases only."""
    report = IngestReport(store=str(store_path))
    for line in errors:
        report.failed[line.split(":")[0]] = line
    root = _open_root(store_path)
    slices: dict[str, int] = dict(root.attrs.get("case_slices", {}))
    todo = _plan(cases, root, cfg, report)
    done: dict[str, int] = {cid: slices[cid] for cid in report.skipped}
    if todo:
        done |= _convert(todo, store_path / "cases", cfg, progress, report)
    _reconcile(store_path / "cases", {c.case_id for c in cases}, slices, done, report, prune)
    ordered = sorted(done, key=case_order)
    report.splits = split_cases(ordered, cfg.split.fractions, cfg.split.seed)
    report.written.sort(key=case_order)
    root.attrs.update(_root_attrs(cfg, {c: done[c] for c in ordered}, report.splits))
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
