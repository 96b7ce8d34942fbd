"""The store's folder: what ingest may delete, swap or lock, so that it never loses what is not the store's.

A rebuild swaps and deletes the store folder whole, so the store may hold only its own files (`zarr.json`
and `cases/`) and never the raw folder (nor lie in it); leftovers of interrupted runs are hidden siblings
(`.NAME.new-<hex>`, `.NAME.old-<hex>`) and `cases/.tmp-*` groups; one ingest per store runs at a time
(a lock file `.NAME.lock` beside it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

import zarr

from liverseg.core.errors import StoreError
from liverseg.data.lits import CASE_ID
from liverseg.data.store import FORMAT

TMP_PREFIX = ".tmp-"  # a case group being written, `cases/.tmp-<id>-<hex>`
NEW_SUFFIX, OLD_SUFFIX = ".new-", ".old-"  # sibling stores of a geometry change: `.<name>.new-<hex>`
STORE_ENTRIES = frozenset({"zarr.json", "cases"})  # all a store's folder holds: the rest is not ours to delete


@contextlib.contextmanager
def store_lock(store_path: Path, store: str | Path, me: str = "ingest"):
    """One ingest (or publish, `me`) per store at a time; a second is refused: its clean-up of interrupted
    runs would delete the first one's half-built copy, their swaps would interleave, a publish would
    upload a store half rewritten. The lock file (`.NAME.lock`
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
            raise StoreError(
                f"{store}: another ingest is writing this store (or a publish is reading it); {me} again when it has ended"
            ) from None
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


def checked_store(raw: Path, store: Path) -> Path:
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
    foreign = foreign_entries(store_r)
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


def foreign_entries(folder: Path) -> list[str]:
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


def remove_store_folder(folder: Path) -> bool:
    """Delete a store folder that ingest made (a rebuild's old or half-built copy); one holding anything
    else is kept (False): deleting it would lose files nobody asked ingest to touch."""
    if foreign_entries(folder):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def siblings(store_path: Path, suffix: str) -> list[Path]:
    return sorted(store_path.parent.glob(f".{store_path.name}{suffix}*"))


def recover_swap(store_path: Path) -> None:
    """Undo what an interrupted geometry change left: its half-built store, or the moved-away old one."""
    for half_built in siblings(store_path, NEW_SUFFIX):
        remove_store_folder(half_built)
    olds = siblings(store_path, OLD_SUFFIX)
    if olds and not store_path.exists():  # killed between the two renames of the swap
        os.rename(olds.pop(), store_path)
    for old in olds:
        remove_store_folder(old)


def open_root(store_path: Path) -> zarr.Group:
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
