"""LiTS reader: discover `volume-N` / `segmentation-N` NIfTI pairs, validate them, reorient to RAS.

Canonical orientation is RAS+ (nibabel's closest canonical): array axes (x, y, z) increase towards
world +R, +A, +S. Arrays are then held as (Z, Y, X), so Z is
the axial axis (inferior -> superior) and each slice is (H=Y, W=X). The file's own affine is kept so
that masks can be written back on the input's grid.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from liverseg.core.errors import InputError, TooLarge, one_line
from liverseg.core.limits import MAX_DECODED_BYTES, VolumeLimits
from liverseg.data.nifti import (
    GZIP_MAGIC,
    NIFTI2_SIZEOF_HDR,
    check_header,
    declared_beyond,
    decode_budget,
    gunzip,
    read_header,
)

NAME = re.compile(r"^(volume|segmentation)-(\w+)\.nii(\.gz)?$")  # LiTS file naming: kind, case id, .gz
CASE_ID = re.compile(r"\w+")  # a LiTS case id (NAME's second group): never a path, so cases/<id> stays inside
SUFFIXES = (".nii", ".nii.gz")
RAS = axcodes2ornt(("R", "A", "S"))
AFFINE_TOL = 1e-3  # mm; scanners write affines with float32 rounding


@dataclass
class CasePaths:
    case_id: str
    volume: Path
    segmentation: Path | None


@dataclass
class CTVolume:
    """A CT volume in canonical orientation.

    image: (Z, Y, X) int16 HU; affine: the file's own 4x4 (mm); canonical_affine: RAS+ 4x4 of the
    (X, Y, Z) canonical array; shape: the file's own 3-D shape; spacing: canonical (x, y, z) mm;
    sha256: of the file's bytes as stored (compressed or not).
    """

    image: np.ndarray
    affine: np.ndarray
    canonical_affine: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    sha256: str
    header: nib.Nifti1Header  # the file's own, to write masks back on its grid
    mask: np.ndarray | None = None  # (Z, Y, X) uint8 {0,1,2}
    mask_sha256: str | None = None


def discover(raw_dir: str | Path) -> tuple[list[CasePaths], list[str]]:
    """Find LiTS pairs in a folder. Returns (cases sorted by id, one error line per bad case)."""
    raw = Path(raw_dir)
    if not raw.is_dir():
        raise InputError(f"{raw}: not a folder")
    found: dict[str, dict[str, list[Path]]] = {}
    for p in sorted(raw.iterdir()):
        m = NAME.match(p.name)
        if m:
            found.setdefault(m.group(2), {}).setdefault(m.group(1), []).append(p)
    cases, errors = [], []
    for cid in sorted(found, key=case_order):
        kinds = found[cid]
        dup = [ps for ps in kinds.values() if len(ps) > 1]
        if dup:
            errors.append(f"{dup[0][0].name}: duplicate case id {cid} ({', '.join(p.name for p in dup[0])})")
            continue
        if "volume" not in kinds:
            errors.append(f"{kinds['segmentation'][0].name}: segmentation without volume-{cid}")
            continue
        seg = kinds.get("segmentation", [None])[0]
        cases.append(CasePaths(cid, kinds["volume"][0], seg))
    return cases, errors


def case_order(case_id: str) -> tuple[int, str]:
    """LiTS ids in numeric order: 2 before 10 (the order of every listing of cases)."""
    return len(case_id), case_id


def segmentation_name(volume_name: str) -> str:
    """The mask's file name for a CT file: volume-7.nii -> segmentation-7.nii.gz (LiTS naming), any other
    ct.nii[.gz] -> ct.nii.gz."""
    stem = volume_name.removesuffix(".gz").removesuffix(".nii")
    if stem.startswith("volume-"):
        stem = "segmentation-" + stem.removeprefix("volume-")
    return stem + ".nii.gz"


def read_file(path: Path | str) -> bytes:
    """A file's bytes; TooLarge when it holds more than MAX_DECODED_BYTES (what any NIfTI may decode to),
    checked before reading."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_DECODED_BYTES:
                raise TooLarge(f"{Path(path).name}: {size} bytes, more than the limit of {MAX_DECODED_BYTES}")
            return f.read()
    except OSError as e:
        raise InputError(f"{Path(path).name}: cannot read ({e.strerror or one_line(e)})") from None


def load_nifti(path: Path | str, data: bytes | None = None, limits: VolumeLimits | None = None) -> nib.Nifti1Image:
    """Open a NIfTI-1/2 file (or its bytes, gzipped or not) as a usable 3-D image, squeezing trailing 1s.

    The header is read first and checked against `limits` (default: core.limits' numbers), so a volume
    too large in any dimension is refused (TooLarge, naming the limit) before a voxel is decompressed;
    the file then decompresses within what its header declares. The whole file is read and decompressed
    in memory: one pass over the disk, and voxels are then viewed in place (`_array`) instead of being
    streamed through Python's gzip.
    """
    name = Path(path).name
    data = read_file(path) if data is None else data
    if not data:
        raise InputError(f"{name}: empty file")
    hdr, limits = read_header(data, name), limits or VolumeLimits()
    stored = None if data[:2] == GZIP_MAGIC else len(data)
    raw = gunzip(data, name, *decode_budget(check_header(hdr, name, limits, stored), limits))
    try:
        klass = nib.Nifti2Image if raw[:4] in NIFTI2_SIZEOF_HDR else nib.Nifti1Image
        img = klass.from_bytes(raw)
    except Exception as e:  # nibabel raises several types for non-NIfTI input
        raise InputError(
            f"{name}: not a NIfTI file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    shape = img.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4:
        raise InputError(f"{name}: 4-D image holding {shape[3]} volumes; expected one 3-D volume")
    if len(shape) != 3:
        raise InputError(f"{name}: {len(shape)}-D image of shape {tuple(shape)}; expected 3-D")
    if min(shape) < 1:
        raise InputError(f"{name}: empty shape {tuple(shape)}")
    return img


def _array(img: nib.Nifti1Image, name: str, integer_dtype: bool) -> np.ndarray:
    """Voxels with scl_slope/scl_inter applied: raw integers when unscaled and `integer_dtype`, else float32.

    An image from `load_nifti` holds its decompressed bytes; the voxels are a read-only view of them.
    """
    proxy = img.dataobj
    if proxy.dtype.kind not in "iuf":  # RGB (structured) or complex: no single intensity per voxel
        kind = img.header.get_value_label("datatype")
        raise InputError(f"{name}: voxel type {kind} is not a real scalar; expected integer or float voxels")
    slope, inter = float(proxy.slope), float(proxy.inter)
    buf = proxy.file_like.getbuffer()
    count = math.prod(int(s) for s in proxy.shape)  # Python ints: a NIfTI-2 shape can overflow int64
    if proxy.offset + count * proxy.dtype.itemsize > len(buf):
        shape = tuple(int(s) for s in proxy.shape)
        raise declared_beyond(name, shape, proxy.dtype, count * proxy.dtype.itemsize, len(buf) - int(proxy.offset))
    raw = np.frombuffer(buf, proxy.dtype, count=count, offset=proxy.offset)
    arr = raw.reshape(proxy.shape, order=proxy.order)
    arr = arr.reshape(arr.shape[:3], order="F")
    if not (integer_dtype and slope == 1 and inter == 0 and arr.dtype.kind in "iu"):
        arr = arr.astype(np.float32)  # a copy of its own: scaled in place, no second volume-sized temporary
        if slope != 1 or inter != 0:
            arr *= np.float32(slope)
            arr += np.float32(inter)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{name}: {int((~np.isfinite(arr)).sum())} non-finite voxels (NaN/inf)")
    return arr


def to_canonical(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) array in the file's orientation -> ((Z, Y, X) RAS+ array, RAS+ affine of (X, Y, Z))."""
    t = ornt_transform(io_orientation(affine), RAS)
    canon = apply_orientation(arr, t)
    canon_affine = affine @ inv_ornt_aff(t, arr.shape)
    return np.ascontiguousarray(canon.transpose(2, 1, 0)), canon_affine


def from_canonical(arr_zyx: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of `to_canonical`: (Z, Y, X) RAS+ array -> (X, Y, Z) array, Fortran-ordered, on the grid of the
    file with `affine`."""
    t = ornt_transform(RAS, io_orientation(affine))
    # Fortran order: NIfTI's own layout, so writing needs no second transpose (for a RAS file, and a
    # C-ordered (Z, Y, X) input, no copy at all: 2 s less for a 512x512x400 mask).
    return np.asfortranarray(apply_orientation(arr_zyx.transpose(2, 1, 0), t))


def to_hu_int16(arr: np.ndarray, scratch: bool = False) -> np.ndarray:
    """HU as int16: rounded and clipped to int16's range. `scratch`: a float `arr` may be overwritten on
    the way (a 1 GiB float32 volume then needs no two more of its size); integers are clipped as they are."""
    if arr.dtype == np.int16:
        return arr
    if arr.dtype.kind in "iu":
        info = np.iinfo(arr.dtype)
        return np.clip(arr, max(-32768, info.min), min(32767, info.max)).astype(np.int16)
    if not scratch:
        return np.clip(np.rint(arr), -32768, 32767).astype(np.int16)
    np.rint(arr, out=arr)
    np.clip(arr, -32768, 32767, out=arr)
    return arr.astype(np.int16)


def read_volume(path: Path | str, data: bytes | None = None, limits: VolumeLimits | None = None) -> CTVolume:
    """Read one CT volume (file or bytes, read once: decoded and hashed) into canonical int16 HU, within
    `limits` (see `load_nifti`)."""
    path = Path(path)
    data = read_file(path) if data is None else data
    img = load_nifti(path, data, limits)
    arr = _array(img, path.name, integer_dtype=True)
    affine = img.affine.astype(np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{path.name}: affine is singular or not finite")
    image, canon_affine = to_canonical(to_hu_int16(arr, scratch=arr.dtype.kind == "f"), affine)  # _array's copy
    spacing = tuple(float(s) for s in voxel_sizes(canon_affine))
    return CTVolume(
        image,
        affine,
        canon_affine,
        tuple(int(s) for s in arr.shape),
        spacing,
        hashlib.sha256(data).hexdigest(),
        img.header.copy(),
    )


def check_slices(image_zyx: np.ndarray, name: str, max_slices: int) -> None:
    """Refuse a volume with more than `max_slices` axial slices before any is resized: each becomes a
    model-size float32 slice, so a few bytes declaring (1, 1, 4e6) voxels would ask for 61 GiB."""
    if image_zyx.shape[0] > max_slices:
        raise TooLarge(f"{name}: {image_zyx.shape[0]} axial slices exceed the limit of {max_slices}", "max_slices")


def read_labels(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """A label mask of any tool (a prediction to score, a reference): (voxels (X, Y, Z) as stored, affine
    4x4 mm), read with ingest's checks and limits (NIfTI, 3-D, within core.limits' VolumeLimits,
    declared shape present, real scalar voxels, finite after scaling) and whole non-negative labels."""
    name = Path(path).name
    img = load_nifti(path)
    arr = _array(img, name, integer_dtype=True)
    if arr.dtype.kind == "f":
        whole = np.equal(np.mod(arr, 1), 0)
        if not whole.all():
            raise InputError(f"{name}: {int(arr.size - whole.sum())} voxels are not whole labels (a probability map?)")
    if arr.size and arr.min() < 0:
        raise InputError(f"{name}: negative labels (down to {arr.min():g}); expected 0 background, 1+ labels")
    affine = img.affine.astype(np.float64)
    if not np.isfinite(affine).all():
        raise InputError(f"{name}: affine is not finite")
    return arr, affine


def _labels_ok(seg: np.ndarray) -> bool:
    """All voxels in {0, 1, 2}; two linear passes for integers (no sort: volumes are 10^8 voxels)."""
    if seg.dtype.kind in "iu":
        return bool(seg.min() >= 0 and seg.max() <= 2)
    return bool(((seg == 0) | (seg == 1) | (seg == 2)).all())


def read_case(case: CasePaths) -> CTVolume:
    """Read and validate a volume with its segmentation (labels {0,1,2}, same grid)."""
    if case.segmentation is None:
        raise InputError(f"{case.volume.name}: missing segmentation-{case.case_id}.nii[.gz]")
    vol = read_volume(case.volume)
    seg_name = case.segmentation.name
    seg_data = read_file(case.segmentation)
    seg_img = load_nifti(case.segmentation, seg_data)
    seg = _array(seg_img, seg_name, integer_dtype=True)
    if tuple(seg.shape) != vol.shape:
        raise InputError(f"{seg_name}: shape {tuple(seg.shape)} differs from {case.volume.name} {vol.shape}")
    if not np.allclose(seg_img.affine, vol.affine, atol=AFFINE_TOL):
        diff = float(np.abs(seg_img.affine - vol.affine).max())
        raise InputError(f"{seg_name}: affine differs from {case.volume.name} by {diff:.3g} mm (> {AFFINE_TOL})")
    if not _labels_ok(seg):
        bad = [int(v) if float(v).is_integer() else v for v in np.unique(seg).tolist() if v not in (0, 1, 2)]
        raise InputError(f"{seg_name}: labels {bad[:5]} outside {{0, 1, 2}}")
    mask, _ = to_canonical(seg, vol.affine)
    vol.mask = mask.astype(np.uint8, copy=False)
    vol.mask_sha256 = hashlib.sha256(seg_data).hexdigest()
    return vol
