"""gzip decoding of NIfTI bytes (`.nii.gz`, uploads) with ISA-L (about 2x zlib): every layer (gzip of gzip)
and every member (bgzip/BGZF, `cat a.gz b.gz`) within one budget of decompressed bytes, trailing garbage
refused. One decoder for ingest, predict, score and serve.
"""

from __future__ import annotations

import zlib

from isal import isal_zlib

from liverseg.core.errors import InputError, TooLarge

GZIP_MAGIC = b"\x1f\x8b"
# input fed per call after a file's first gzip member: at each member's end the decompressor copies the
# input it did not use, so whole-rest feeding would be quadratic for bgzip's thousands of 64 KiB members
MEMBER_STEP = 1 << 20


def gunzip(data: bytes, name: str, limit: int = 0) -> bytes:
    """Decompress gzip bytes with ISA-L (about 2x zlib), layer after layer (gzip of gzip ...); other
    bytes pass through. Each layer may hold several members (bgzip/BGZF, `cat a.gz b.gz`), as gzip
    allows; bytes after the last member that are not gzip are an error, never silently dropped.

    limit: refuse when every layer and member together decompress to more than this many bytes (0: no
    limit), so neither a gzip bomb, a nested one nor one of many members grows past it in memory.
    """
    budget = [limit]  # shared by every layer and member: what may still be decompressed
    while data[:2] == GZIP_MAGIC:
        data = _gunzip_layer(data, name, budget, limit)
    return data


def _gunzip_layer(data: bytes, name: str, budget: list[int], limit: int) -> bytes:
    """One gzip layer: every member in turn, all within what is left of `budget`."""
    mv = memoryview(data)
    out, pos = _gunzip_member(mv, 0, len(mv), name, budget, limit)  # usually the only one: no join, no copy
    parts = [out]
    while pos < len(mv):
        if bytes(mv[pos : pos + 2]) != GZIP_MAGIC:
            raise InputError(f"{name}: cannot decode ({len(mv) - pos} bytes of trailing garbage after the gzip data)")
        out, pos = _gunzip_member(mv, pos, MEMBER_STEP, name, budget, limit)
        parts.append(out)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _gunzip_member(mv: memoryview, pos: int, step: int, name: str, budget: list[int], limit: int) -> tuple[bytes, int]:
    """(the member starting at `pos`, decompressed; where the next begins), fed `step` bytes at a time.

    budget: a one-item list, what may still be decompressed, charged here (used only when `limit`)."""
    d = isal_zlib.decompressobj(wbits=31)
    pieces = []
    while not d.eof:
        if pos >= len(mv):
            raise InputError(f"{name}: cannot decode (truncated gzip stream)")
        chunk = mv[pos : pos + step]
        pos += len(chunk)
        try:  # one byte past the budget tells "too large" from "exactly the budget"
            out = d.decompress(chunk, budget[0] + 1) if limit else d.decompress(chunk)
        except (isal_zlib.error, zlib.error) as e:
            raise InputError(f"{name}: cannot decode (gzip: {e})") from None
        if limit and len(out) > budget[0]:
            raise TooLarge(f"{name}: decompresses to more than {limit} bytes (too large)")
        budget[0] -= len(out)
        pieces.append(out)
    return (pieces[0] if len(pieces) == 1 else b"".join(pieces)), pos - len(d.unused_data)
