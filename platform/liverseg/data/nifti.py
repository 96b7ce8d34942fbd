"""NIfTI bytes before their voxels: gzip layers decoded within one budget, and the header read first and
checked against `VolumeLimits`, so that a few bytes declaring a huge volume are refused before any
voxel is decompressed or allocated (`lits.load_nifti` puts the two together)."""

from __future__ import annotations

import io
import math
import zlib

import nibabel as nib
from isal import isal_zlib
from nibabel.orientations import io_orientation

from liverseg.core.errors import InputError, TooLarge
from liverseg.core.limits import DECODED_SLACK, VolumeLimits

NIFTI1_SIZEOF_HDR = ((348).to_bytes(4, "little"), (348).to_bytes(4, "big"))
NIFTI2_SIZEOF_HDR = ((540).to_bytes(4, "little"), (540).to_bytes(4, "big"))
NIFTI1_MAGIC, NIFTI2_MAGIC = b"n+1\0", b"n+2\0\r\n\x1a\n"  # single-file magics (a .hdr/.img pair has no voxels here)
GZIP_MAGIC = b"\x1f\x8b"
# input fed per call after a file's first gzip member: at each member's end the decompressor copies the
# input it did not use, so whole-rest feeding would be quadratic for bgzip's thousands of 64 KiB members
MEMBER_STEP = 1 << 20
HEADER_BYTES = 540  # NIfTI-2's header; NIfTI-1's is 348
PEEK_LAYER = 64 * 1024  # decompressed bytes of an outer gzip layer read to find the next layer's header
MAX_PEEK_LAYERS = 16  # gzip of gzip ... (a gzip quine decompresses to itself for ever)


def gunzip(data: bytes, name: str, limit: int = 0, why: str = "too large") -> bytes:
    """Decompress gzip bytes with ISA-L (about 2x zlib), layer after layer (gzip of gzip ...); other
    bytes pass through. Each layer may hold several members (bgzip/BGZF, `cat a.gz b.gz`), as gzip
    allows; bytes after the last member that are not gzip are an error, never silently dropped.

    limit: refuse (TooLarge, naming `why`) when every layer and member together decompress to more than
    this many bytes (0: no limit), so neither a gzip bomb, a nested one nor one of many members grows
    past it in memory.
    """
    budget = [limit]  # shared by every layer and member: what may still be decompressed
    while data[:2] == GZIP_MAGIC:
        data = _gunzip_layer(data, name, budget, limit, why)
    return data


def _gunzip_layer(data: bytes, name: str, budget: list[int], limit: int, why: str) -> bytes:
    """One gzip layer: every member in turn, all within what is left of `budget`."""
    mv = memoryview(data)
    out, pos = _gunzip_member(mv, 0, len(mv), name, budget, (limit, why))  # usually the only one: no copy
    parts = [out]
    while pos < len(mv):
        if bytes(mv[pos : pos + 2]) != GZIP_MAGIC:
            raise InputError(f"{name}: cannot decode ({len(mv) - pos} bytes of trailing garbage after the gzip data)")
        out, pos = _gunzip_member(mv, pos, MEMBER_STEP, name, budget, (limit, why))
        parts.append(out)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _gunzip_member(
    mv: memoryview, pos: int, step: int, name: str, budget: list[int], limit: tuple[int, str]
) -> tuple[bytes, int]:
    """(the member starting at `pos`, decompressed; where the next begins), fed `step` bytes at a time.

    budget: a one-item list, what may still be decompressed, charged here (used only when limit[0])."""
    d = isal_zlib.decompressobj(wbits=31)
    pieces = []
    while not d.eof:
        if pos >= len(mv):
            raise InputError(f"{name}: cannot decode (truncated gzip stream)")
        chunk = mv[pos : pos + step]
        pos += len(chunk)
        try:  # one byte past the budget tells "too large" from "exactly the budget"
            out = d.decompress(chunk, budget[0] + 1) if limit[0] else d.decompress(chunk)
        except (isal_zlib.error, zlib.error) as e:
            raise InputError(f"{name}: cannot decode (gzip: {e})") from None
        if limit[0] and len(out) > budget[0]:
            raise TooLarge(f"{name}: decompresses to more than {limit[0]} bytes ({limit[1]})", "max_decoded_mb")
        budget[0] -= len(out)
        pieces.append(out)
    return (pieces[0] if len(pieces) == 1 else b"".join(pieces)), pos - len(d.unused_data)


def head(data: bytes, name: str, want: int = HEADER_BYTES) -> bytes:
    """The first `want` bytes of `data` once every gzip layer is removed, decompressing only about that
    much (at most PEEK_LAYER bytes of each outer layer): enough to read a header before the voxels."""
    layer = memoryview(data)
    for _ in range(MAX_PEEK_LAYERS):
        if bytes(layer[:2]) != GZIP_MAGIC:
            return bytes(layer[:want])
        layer = memoryview(_prefix(layer, name, PEEK_LAYER))
    raise InputError(f"{name}: cannot decode (more than {MAX_PEEK_LAYERS} nested gzip layers)")


def _prefix(mv: memoryview, name: str, n: int) -> bytes:
    """Up to `n` decompressed bytes from the start of one gzip layer (its members in turn); fewer when
    the layer is shorter or truncated (the full decode names that)."""
    out, pos = b"", 0
    while len(out) < n and bytes(mv[pos : pos + 2]) == GZIP_MAGIC:
        d, feed = isal_zlib.decompressobj(wbits=31), mv[pos : pos + 65536]
        pos += len(feed)
        while True:
            try:
                out += d.decompress(feed, n - len(out))
            except (isal_zlib.error, zlib.error) as e:
                raise InputError(f"{name}: cannot decode (gzip: {e})") from None
            if d.eof or len(out) >= n:
                break
            feed = d.unconsumed_tail or mv[pos : pos + 65536]
            if not d.unconsumed_tail:
                pos += len(feed)
            if not feed:
                return out
        if not d.eof:
            return out
        pos -= len(d.unused_data)  # the next member begins there
    return out


def read_header(data: bytes, name: str) -> nib.Nifti1Header:
    """The single-file NIfTI-1 or NIfTI-2 header at the start of `data` (gzipped or not), read before any
    voxel; its size field and magic are checked here (nibabel would log a "fix" for each and go on)."""
    block = head(data, name)
    nifti2 = block[:4] in NIFTI2_SIZEOF_HDR
    if not (
        nifti2 and block[4:12] == NIFTI2_MAGIC or block[:4] in NIFTI1_SIZEOF_HDR and block[344:348] == NIFTI1_MAGIC
    ):
        raise InputError(f"{name}: not a NIfTI file (no single-file NIfTI-1 or NIfTI-2 header)")
    try:
        return (nib.Nifti2Header if nifti2 else nib.Nifti1Header).from_fileobj(io.BytesIO(block), check=False)
    except Exception as e:  # nibabel raises several types for a broken header
        raise InputError(
            f"{name}: not a NIfTI file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None


def declared_beyond(name: str, shape: tuple[int, ...], dtype: object, declared: int, present: int) -> InputError:
    """The error for a header whose voxels need more bytes than the file holds."""
    return InputError(
        f"{name}: declared shape {tuple(shape)} of {dtype} exceeds the data ({declared} bytes declared, "
        f"{max(present, 0)} present)"
    )


def check_header(hdr: nib.Nifti1Header, name: str, limits: VolumeLimits, stored: int | None = None) -> int:
    """Refuse a header whose volume passes a limit (TooLarge, naming it) or, for an uncompressed file of
    `stored` bytes, needs more bytes than that (InputError); returns the bytes the file decodes to.

    Slices are counted along the axis the affine makes axial (the reader reorients to RAS+), the
    in-plane size on the two others, voxels over every axis; sizes are Python ints (NIfTI-2 may declare
    2**120 voxels)."""
    try:
        shape, dtype = tuple(int(s) for s in hdr.get_data_shape()), hdr.get_data_dtype()
        offset = int(hdr.get_data_offset())
    except Exception as e:  # an unknown datatype code or a broken dim field
        raise InputError(
            f"{name}: not a NIfTI file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if not shape or min(shape) < 1:
        raise InputError(f"{name}: empty shape {shape}")
    voxels = math.prod(shape)
    declared = offset + voxels * dtype.itemsize
    if stored is not None and declared > stored:
        raise declared_beyond(name, shape, dtype, voxels * dtype.itemsize, stored - offset)
    axes = (shape + (1, 1))[:3]
    axial = _axial_axis(hdr)
    inplane = [n for i, n in enumerate(axes) if i != axial]
    key = limits.prefix
    if axes[axial] > limits.max_slices:
        raise TooLarge(
            f"{name}: {axes[axial]} axial slices exceed the limit of {limits.max_slices} ({key}max_slices)",
            "max_slices",
        )
    if max(inplane) > limits.max_inplane:
        raise TooLarge(
            f"{name}: in-plane size {inplane[0]} x {inplane[1]} exceeds the limit of {limits.max_inplane} "
            f"per axis ({key}max_inplane)",
            "max_inplane",
        )
    if voxels > limits.max_voxels:
        raise TooLarge(
            f"{name}: {voxels} voxels exceed the limit of {limits.max_voxels} ({key}max_voxels)", "max_voxels"
        )
    if declared > limits.max_decoded_bytes:
        raise TooLarge(
            f"{name}: decodes to {declared} bytes, over the limit of {limits.max_decoded_bytes >> 20} MiB "
            f"({key}max_decoded_mb)",
            "max_decoded_mb",
        )
    return declared


def _axial_axis(hdr: nib.Nifti1Header) -> int:
    """The array axis the header's affine maps onto superior-inferior (the third when it cannot tell)."""
    try:
        ornt = io_orientation(hdr.get_best_affine())
        return next((i for i in range(3) if ornt[i, 0] == 2), 2)
    except Exception:  # a singular or non-finite affine: refused later, after the size checks
        return 2


def decode_budget(declared: int, limits: VolumeLimits) -> tuple[int, str]:
    """(bytes a file with this header may decompress to, why): its declared size with a little slack,
    never past `limits.max_decoded_bytes`."""
    if declared + DECODED_SLACK < limits.max_decoded_bytes:
        return declared + DECODED_SLACK, f"its header declares {declared}"
    return limits.max_decoded_bytes, f"{limits.prefix}max_decoded_mb"
