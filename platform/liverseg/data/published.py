"""A published slice store: immutable versions behind one pointer, on object storage (`publish` writes it).

    <url>/current.json                    the pointer: {"format": "liverseg-published-store", "format_version":
                                          1, "version": VID, "previous": VID | null, "published_at", "by"};
                                          replaced by one PUT, the last step of a publish
    <url>/versions/<VID>/manifest.json    a version: every key of the Zarr store -> the object holding its bytes
                                          (size, md5, sha256), written once and never changed
    <url>/versions/<VID>/files/<key>      the bytes this version added; later versions refer to them

VID: 16 hex digits of a sha256 over the store's keys and their sha256 (the same content is the same
version). A reader resolves the pointer once and then reads only that version's objects, which nothing
overwrites, so a publish running meanwhile never shows it a mix; `<url>/versions/<VID>` opens one version
(pinned). A URL without a pointer is read as a plain Zarr store (a store uploaded before versions existed).
Reading goes through fsspec's reference filesystem (kerchunk's format: key -> [object URL]).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from liverseg.core.errors import StoreError, one_line
from liverseg.core.limits import MAX_MANIFEST_BYTES

POINTER, VERSIONS, MANIFEST, FILES = "current.json", "versions", "manifest.json", "files"
POINTER_FORMAT, MANIFEST_FORMAT, FORMAT_VERSION = "liverseg-published-store", "liverseg-store-version", 1
VID = re.compile(r"[0-9a-f]{16}")
KEY = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*(/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)*")  # no '..', no hidden part
PINNED = re.compile(r"(?P<root>.+?)/versions/(?P<vid>[0-9a-f]{16})/?")
HEX = {"md5": re.compile(r"[0-9a-f]{32}"), "sha256": re.compile(r"[0-9a-f]{64}")}


@dataclass(frozen=True)
class Entry:
    """Where one store key's bytes are: `object` (relative to the store's URL), size in bytes, digests."""

    object: str
    size: int
    md5: str  # what S3 reports as the ETag of a single-part upload: finds an interrupted run's uploads
    sha256: str


@dataclass
class Manifest:
    """One published version: its id, every store key's object, and when, by whom, how many cases."""

    version: str
    files: dict[str, Entry]
    created_at: str = ""
    by: str = ""
    cases: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "created_at": self.created_at,
            "by": self.by,
            "cases": self.cases,
            "files": {k: asdict(e) for k, e in sorted(self.files.items())},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> Manifest:
        """Checked field by field: a tampered manifest is one line naming what is wrong, never read outside
        the store's URL (every object is `versions/<VID>/files/<its key>`)."""
        if d.get("format") != MANIFEST_FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{where}: not a liverseg store version (format {str(d.get('format'))[:40]!r})")
        files = d.get("files")
        if not isinstance(files, dict) or not files:
            raise StoreError(f"{where}: 'files' is not a mapping of store keys")
        entries = {}
        for key, e in files.items():
            if not (isinstance(key, str) and KEY.fullmatch(key)):
                raise StoreError(f"{where}: {str(key)[:80]!r} is not a store key")
            entries[key] = _entry(e, key, where)
        meta = {k: d.get(k, "") for k in ("version", "created_at", "by")}
        if not VID.fullmatch(str(meta["version"])) or not all(isinstance(v, str) for v in meta.values()):
            raise StoreError(f"{where}: version, created_at and by must be text (version: 16 hex digits)")
        cases = d.get("cases", 0)
        if not isinstance(cases, int) or isinstance(cases, bool) or cases < 0:
            raise StoreError(f"{where}: 'cases' is not a count")
        return cls(meta["version"], entries, meta["created_at"], meta["by"], cases)


def _entry(e: Any, key: str, where: str) -> Entry:
    try:
        entry = Entry(**e)
    except TypeError:
        raise StoreError(f"{where}: {key}: expected object, size, md5 and sha256") from None
    owner = entry.object.split("/")[1] if isinstance(entry.object, str) and entry.object.count("/") > 2 else ""
    if not (VID.fullmatch(owner) and entry.object == object_key(owner, key)):
        raise StoreError(f"{where}: {key}: object {str(entry.object)[:80]!r} is not versions/<VID>/files/{key}")
    if not isinstance(entry.size, int) or isinstance(entry.size, bool) or entry.size < 0:
        raise StoreError(f"{where}: {key}: size {entry.size!r} is not a byte count")
    for name, pattern in HEX.items():
        if not (isinstance(getattr(entry, name), str) and pattern.fullmatch(getattr(entry, name))):
            raise StoreError(f"{where}: {key}: {name} is not a hex digest")
    return entry


def store_name(url: str) -> str:
    """The store's own name (`lits.zarr`), also for a pinned `<url>/versions/<VID>`."""
    m = PINNED.fullmatch(url)
    return (m["root"] if m else url).rstrip("/").rsplit("/", 1)[-1]


def object_key(vid: str, key: str) -> str:
    """Where version `vid` keeps the bytes it added for store key `key`, relative to the store's URL."""
    return f"{VERSIONS}/{vid}/{FILES}/{key}"


def version_id(sha256s: dict[str, str]) -> str:
    """The id of a store's content: 16 hex digits of a sha256 over its keys and their sha256, sorted."""
    body = "".join(f"{key}\t{digest}\n" for key, digest in sorted(sha256s.items()))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def read_json(fs: Any, path: str, what: str) -> dict[str, Any] | None:
    """A small JSON object at `path` (None when absent), read within MAX_MANIFEST_BYTES; StoreError in
    one line when it is unreadable, too large, not JSON or not an object."""
    try:
        data = fs.cat_file(path, start=0, end=MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return None
    except Exception as e:
        raise StoreError(f"{path}: cannot read {what} ({one_line(e)})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise StoreError(f"{path}: {what} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        d = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise StoreError(f"{path}: {what} is not JSON ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise StoreError(f"{path}: {what} is not a JSON object")
    return d


def read_pointer(fs: Any, root: str) -> dict[str, Any] | None:
    """The pointer of the store at `root` (bucket/path), None when it has none (a plain Zarr store)."""
    d = read_json(fs, f"{root}/{POINTER}", "the version pointer")
    if d is None:
        return None
    vid = d.get("version")
    if d.get("format") != POINTER_FORMAT or d.get("format_version") != FORMAT_VERSION or not isinstance(vid, str):
        raise StoreError(f"{root}/{POINTER}: not a liverseg version pointer")
    if not VID.fullmatch(vid):
        raise StoreError(f"{root}/{POINTER}: version {vid[:40]!r} is not 16 hex digits")
    return d


def read_manifest(fs: Any, root: str, vid: str) -> Manifest:
    where = f"{root}/{VERSIONS}/{vid}/{MANIFEST}"
    d = read_json(fs, where, "the version's manifest")
    if d is None:
        raise StoreError(f"{where}: no such version")
    manifest = Manifest.from_json(d, where)
    if manifest.version != vid:
        raise StoreError(f"{where}: names version {manifest.version}, not {vid}")
    return manifest


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str | None, str]:
    """What Zarr opens for `url`: (store or URL, version id or None, pinned URL).

    A published store: its current version (read once), or the version a `.../versions/<VID>` URL names,
    as a read-only Zarr store over that version's objects. A local path or a URL without a pointer:
    itself, read in place (version None)."""
    if "://" not in url:
        return url, None, url
    import fsspec

    m = PINNED.fullmatch(url)
    root_url, vid = (m["root"], m["vid"]) if m else (url.rstrip("/"), None)
    fs, root = fsspec.core.url_to_fs(root_url, **(storage_options or {}))
    root = root.rstrip("/")
    if vid is None:
        pointer = read_pointer(fs, root)
        if pointer is None:
            return url, None, url
        vid = pointer["version"]
    manifest = read_manifest(fs, root, vid)
    return _reference_store(root_url, manifest, storage_options), vid, f"{root_url}/{VERSIONS}/{vid}"


def _reference_store(root_url: str, manifest: Manifest, storage_options: dict[str, Any] | None) -> Any:
    """A read-only Zarr store whose keys are the manifest's, each read from its object."""
    from fsspec.core import split_protocol
    from fsspec.implementations.reference import ReferenceFileSystem
    from zarr.storage import FsspecStore

    protocol = split_protocol(root_url)[0]
    refs = {key: [f"{root_url}/{e.object}"] for key, e in manifest.files.items()}
    fs = ReferenceFileSystem(
        fo={"version": 1, "refs": refs},
        remote_protocol=protocol,
        remote_options={**(storage_options or {}), "asynchronous": True},
        asynchronous=True,
    )
    return FsspecStore(fs, read_only=True, path="")


def missing_objects(pinned_url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Store keys of the version at `pinned_url` whose object is absent or of another size (one listing)."""
    import fsspec

    m = PINNED.fullmatch(pinned_url)
    fs, root = fsspec.core.url_to_fs(m["root"], **(storage_options or {}))
    root = root.rstrip("/")
    fs.invalidate_cache()  # listings cached by this process may predate a publish
    manifest = read_manifest(fs, root, m["vid"])
    there = {p[len(root) + 1 :]: i.get("size") for p, i in fs.find(f"{root}/{VERSIONS}", detail=True).items()}
    return sorted(k for k, e in manifest.files.items() if there.get(e.object) != e.size)
