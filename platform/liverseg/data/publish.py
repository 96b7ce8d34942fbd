"""Publish: copy a local slice store to object storage (s3://...), incrementally, root metadata last.

Ingest writes a local store (cases are renamed into place, which object stores cannot do); `publish`
uploads it so Ray workers on any node read it from the shared bucket (`SliceStore("s3://...")`).
Credentials and endpoint come from the usual variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL` for MinIO or another S3-compatible store), read by s3fs.

Objects whose size and MD5 (the ETag of a single-part upload) already match are skipped. The root
`zarr.json`, which lists the cases, goes last: a reader never sees a case listed before its arrays
are there. Objects under the target that the local store lacks are reported, never deleted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from liverseg.core.errors import StoreError
from liverseg.data.store import SliceStore

ROOT_META = "zarr.json"


@dataclass
class PublishReport:
    url: str
    uploaded: list[str] = field(default_factory=list)  # relative paths
    unchanged: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # under the target, not in the local store (kept)


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)  # compared with S3's ETag, not a security check
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def publish_store(store: str | Path, url: str) -> PublishReport:
    """Upload the local slice store `store` to `url` (e.g. s3://bucket/stores/lits.zarr).

    Raises StoreError if `store` is not a readable slice store or `url` is not a URL; returns what was
    uploaded, what was already there, and what the target holds beyond the local store.
    """
    import fsspec

    local = Path(store)
    SliceStore(str(local))  # refuses anything that is not a valid store before a byte is sent
    if "://" not in url:
        raise StoreError(f"{url}: expected an object-store URL such as s3://bucket/stores/lits.zarr")
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    files = [f for f in files if not any(part.startswith(".") for part in f.split("/"))]  # temp files
    remote = {k[len(root) + 1 :]: v for k, v in fs.find(root, detail=True).items()} if fs.exists(root) else {}
    report = PublishReport(url)
    for rel in files:
        info = remote.get(rel)
        etag = str((info or {}).get("ETag", "")).strip('"')
        same = info is not None and info.get("size") == (local / rel).stat().st_size and etag == _md5(local / rel)
        (report.unchanged if same else report.uploaded).append(rel)
    report.extra = sorted(set(remote) - set(files))
    body = [r for r in report.uploaded if r != ROOT_META]
    if body:
        fs.put([str(local / r) for r in body], [f"{root}/{r}" for r in body])
    if ROOT_META in report.uploaded:
        fs.put_file(str(local / ROOT_META), f"{root}/{ROOT_META}")
    fs.invalidate_cache()
    return report
