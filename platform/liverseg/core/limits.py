"""Limits on work per input, in one place: every reader (ingest, predict, serve, score) checks the same
numbers, and `pipelines/serve.yaml` may lower the serving ones per replica (`serve.*` keys)."""

from __future__ import annotations

from dataclasses import dataclass

# LiTS volumes have at most ~1000 axial slices; twice that leaves room for thin-slice CT
MAX_SLICES = 2048
MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # a 512x512x1000 int16 volume, uncompressed
# pixels along each in-plane axis: CT is 512 (some scanners 1024); a 16000x16000 upload once took 2.4 GB
MAX_INPLANE = 2048
MAX_VOXELS = 512 * 512 * 1024  # a LiTS-sized volume (the largest is 512x512x987); ~13 bytes each while segmented
MAX_DECODED_BYTES = 1024 * 1024 * 1024  # decompressed NIfTI: a float32 512x512x1000 volume and its header
# decompressed bytes tolerated past what a header declares (writers pad; a bomb behind a small header stops here)
DECODED_SLACK = 1024 * 1024
WEBHOOK_MAX_BYTES = 64 * 1024  # MLflow's alias payload is ~200 bytes
WEBHOOK_MAX_DEPTH = 16  # nesting of a webhook's JSON: MLflow's payload has 2 levels; 30,000 raised RecursionError
MAX_REASON = 1000  # characters of a promotion reason; MLflow caps a tag value at 5000


@dataclass(frozen=True)
class VolumeLimits:
    """Work one volume may ask for, checked on its header before any voxel is decoded (`lits.load_nifti`).

    Sizes in voxels along the axes of the reoriented (RAS+) volume; `max_decoded_bytes` bounds the
    decompressed file (all gzip layers and members together). `prefix` names the limits in refusals
    as their config keys (`serve.` for a replica's)."""

    max_slices: int = MAX_SLICES
    max_inplane: int = MAX_INPLANE
    max_voxels: int = MAX_VOXELS
    max_decoded_bytes: int = MAX_DECODED_BYTES
    prefix: str = ""
