"""Publish: a local slice store becomes an immutable version on object storage (s3://...), the pointer last.

Ingest writes a local store (cases are renamed into place, which object stores cannot do); `publish`
uploads it so Ray workers on any node read it from the shared bucket (`SliceStore("s3://...")`), in the
layout of `published.py`: the files this version changed go under `versions/<VID>/files/`, unchanged
ones are referred to where an earlier version put them, then the version's manifest, and last the
pointer `current.json`, in one PUT. Nothing a reader may be reading is ever overwritten, so readers see
the old version or the new one, never a mix; an interrupted publish leaves the old one current, and a
rerun uploads only what is still missing. Old versions stay unless `keep` asks to delete them.
Credentials and endpoint come from the usual variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL` for MinIO or another S3-compatible store), read by s3fs.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from liverseg.core.clock import utc_now
from liverseg.core.errors import StoreError, one_line
from liverseg.data.published import (
    FILES,
    MANIFEST,
    PINNED,
    POINTER,
    POINTER_FORMAT,
    VERSIONS,
    Entry,
    Manifest,
    object_key,
    read_manifest,
    read_pointer,
    version_id,
)
from liverseg.data.store import SliceStore
from liverseg.data.store_folder import store_lock

UPLOADS_IN_FLIGHT = 8  # objects sent at once: a shard is a few MB, 8 keep a 1 Gb/s link busy


@dataclass
class PublishReport:
    """What a publish did: the version now current at `url`, the one before, what was sent and reused."""

    url: str
    version: str
    previous: str | None  # current before this publish (None: there was none)
    cases: int
    uploaded: list[str] = field(default_factory=list)  # store keys whose bytes were sent
    reused: list[str] = field(default_factory=list)  # store keys already there (an earlier version, a rerun)
    bytes_uploaded: int = 0
    extra: list[str] = field(default_factory=list)  # top-level names under the URL not of the layout (kept)
    versions: int = 0  # versions kept at the URL
    pruned: list[str] = field(default_factory=list)  # versions deleted on request (`keep`)
    seconds: float = 0.0


@dataclass(frozen=True)
class _Local:
    path: Path
    size: int
    md5: str
    sha256: str


def _digests(path: Path) -> _Local:
    md5 = hashlib.md5(usedforsecurity=False)  # compared with S3's ETag, not a security check
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
            sha.update(block)
    return _Local(path, path.stat().st_size, md5.hexdigest(), sha.hexdigest())


def _local_files(local: Path) -> dict[str, _Local]:
    """The store's files by key, without hidden ones (an interrupted ingest's temporary groups)."""
    files = {p.relative_to(local).as_posix(): p for p in local.rglob("*") if p.is_file()}
    return {k: _digests(p) for k, p in sorted(files.items()) if not any(x.startswith(".") for x in k.split("/"))}


def _target(url: str) -> tuple[Any, str]:
    import fsspec

    if "://" not in url:
        raise StoreError(f"{url}: expected an object-store URL such as s3://bucket/stores/lits.zarr")
    if PINNED.fullmatch(url):
        raise StoreError(f"{url}: names one published version, which never changes; publish to the store's URL")
    if url.startswith(("file://", "local://")):
        raise StoreError(f"{url}: a local path; on a shared file system give the store's folder to --store itself")
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()  # s3fs keeps listings per process: one from before another publish would be stale
    return fs, root.rstrip("/")


def publish_store(
    store: str | Path, url: str, progress: Callable[[str], None] | None = None, keep: int | None = None
) -> PublishReport:
    """Publish the local slice store `store` to `url` (e.g. s3://bucket/stores/lits.zarr) as a new version,
    or make its existing version current again; then, with `keep`, delete all but the `keep` newest.

    `progress(key)` is called after each object is uploaded. Raises StoreError if `store` is not a
    readable slice store, an ingest is writing it, `url` is not a URL, or an upload fails (the version
    current before stays current)."""
    t0 = time.monotonic()
    local = Path(store)
    cases = len(SliceStore(str(local)).cases)  # refuses anything that is not a valid store before a byte is sent
    fs, root = _target(url)
    with store_lock(local.resolve(), store, "publish"):  # a stable snapshot: no ingest rewrites it meanwhile
        files = _local_files(local)
        vid = version_id({k: f.sha256 for k, f in files.items()})
        pointer = read_pointer(fs, root)
        previous = pointer["version"] if pointer else None
        entries, todo = _plan(fs, root, vid, previous, files)
        report = PublishReport(url, vid, previous, cases, reused=sorted(set(files) - set(todo)))
        _upload(fs, root, vid, todo, files, report, progress)
        manifest = Manifest(vid, entries, utc_now(), getpass.getuser(), cases)
        if not fs.exists(f"{root}/{VERSIONS}/{vid}/{MANIFEST}"):  # a version, once written, never changes
            fs.pipe_file(f"{root}/{VERSIONS}/{vid}/{MANIFEST}", _json(manifest.to_json()))
        if previous != vid:
            new = {"format": POINTER_FORMAT, "format_version": 1, "version": vid, "previous": previous}
            fs.pipe_file(f"{root}/{POINTER}", _json({**new, "published_at": utc_now(), "by": getpass.getuser()}))
    report.pruned = prune_versions(url, keep) if keep is not None else []
    report.versions = len(version_ids(fs, root))
    report.extra = sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)} - {POINTER, VERSIONS})
    report.seconds = time.monotonic() - t0
    fs.invalidate_cache()
    return report


def _json(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _plan(fs: Any, root: str, vid: str, previous: str | None, files: dict[str, _Local]):
    """(every key's entry in the new version, the keys to upload): a key whose bytes the current version
    (or this version, published before) already holds refers to that object; one an interrupted run of
    this publish uploaded (same size and MD5) is not sent again."""
    known: dict[str, Entry] = {}
    for v in dict.fromkeys([previous, vid]):
        if v and (v != vid or fs.exists(f"{root}/{VERSIONS}/{vid}/{MANIFEST}")):
            known.update(read_manifest(fs, root, v).files)
    entries, todo = {}, []
    for key, f in files.items():
        e = known.get(key)
        if e is not None and e.size == f.size and e.sha256 == f.sha256:
            entries[key] = e
        else:
            entries[key] = Entry(object_key(vid, key), f.size, f.md5, f.sha256)
            todo.append(key)
    prefix = f"{root}/{VERSIONS}/{vid}/{FILES}"
    there = fs.find(prefix, detail=True) if todo else {}
    sent = {p[len(prefix) + 1 :] for p, i in there.items() if _same(i, files.get(p[len(prefix) + 1 :]))}
    return entries, [k for k in todo if k not in sent]


def _same(info: dict[str, Any], f: _Local | None) -> bool:
    return f is not None and info.get("size") == f.size and str(info.get("ETag", "")).strip('"') == f.md5


def _upload(fs, root: str, vid: str, keys: list[str], files: dict[str, _Local], report: PublishReport, progress):
    """Send `keys` (UPLOADS_IN_FLIGHT at a time); a failure is one line saying what stays current."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    pool = ThreadPoolExecutor(UPLOADS_IN_FLIGHT, thread_name_prefix="publish")
    try:
        futures = {pool.submit(fs.put_file, str(files[k].path), f"{root}/{object_key(vid, k)}"): k for k in keys}
        for future in as_completed(futures):
            future.result()
            key = futures[future]
            report.uploaded.append(key)
            report.bytes_uploaded += files[key].size
            if progress:
                progress(key)
    except Exception as e:
        was = f"version {report.previous} stays current" if report.previous else "nothing is current yet"
        raise StoreError(
            f"{report.url}: publish of version {vid} stopped after {len(report.uploaded)} of {len(keys)} "
            f"upload(s) ({one_line(e)}); {was}; run it again to send the rest"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    report.uploaded.sort()


def version_ids(fs: Any, root: str) -> list[str]:
    """Ids of the versions at `root` that have a manifest (a rerun may complete the others)."""
    try:
        found = fs.find(f"{root}/{VERSIONS}", maxdepth=2, withdirs=False)
    except FileNotFoundError:
        return []
    return sorted(p.split("/")[-2] for p in found if p.endswith(f"/{MANIFEST}"))


def list_versions(url: str) -> tuple[str | None, list[Manifest]]:
    """(the current version, every version newest first) of the published store at `url`."""
    fs, root = _target(url)
    pointer = read_pointer(fs, root)
    manifests = [read_manifest(fs, root, v) for v in version_ids(fs, root)]
    return (pointer or {}).get("version"), sorted(manifests, key=lambda m: m.created_at, reverse=True)


def prune_versions(url: str, keep: int) -> list[str]:
    """Delete all but the `keep` newest versions (never the current one) and the objects no kept version
    refers to; returns the deleted versions. Each version's manifest goes first, so a version is whole
    or gone. Run it when no publish to `url` is running (one may be referring to a deleted version)."""
    if keep < 1:
        raise StoreError(f"--keep {keep}: keep at least the current version (1)")
    fs, root = _target(url)
    current, manifests = list_versions(url)
    kept = {m.version for m in manifests[:keep]} | {current}
    needed = {e.object for m in manifests if m.version in kept for e in m.files.values()}
    dropped = [m.version for m in manifests if m.version not in kept]
    for vid in dropped:
        fs.rm_file(f"{root}/{VERSIONS}/{vid}/{MANIFEST}")
        objects = fs.find(f"{root}/{VERSIONS}/{vid}/{FILES}")
        gone = [p for p in objects if p[len(root) + 1 :] not in needed]
        if gone:
            fs.rm(gone)
    fs.invalidate_cache()
    return dropped
