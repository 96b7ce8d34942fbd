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
MAX_REASON = 1000  # characters of a promotion reason (a history record must fit one tag value, below)
# rank 0's metric queue while the tracking server is unreachable: ~10^4 epochs of 8 metrics, ~20 MB
MAX_QUEUED_METRICS = 100_000
TRACKING_NOTICE_S = 10.0  # queued values older than this: the worker's log says the server is unreachable
TRACKING_FLUSH_S = 300.0  # at the end of training, how long rank 0 waits for the server to take the rest
# a published store's pointer and manifests: ~6 objects per case at ~300 bytes, 131 LiTS cases take ~250 KiB
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
# other metadata read back (MLmodel ~2 KB, the model spec ~1 KB, tune-results.json ~0.5 KB per trial)
MAX_METADATA_BYTES = 4 * 1024 * 1024
# MLflow's SQL schema, which PostgreSQL enforces (SQLite does not): registered-model tag values and
# registered-model and version descriptions are varchar(5000), tag keys varchar(250)
MLFLOW_TAG_VALUE_CHARS = 5000
MLFLOW_DESCRIPTION_CHARS = 5000
MLFLOW_TAG_KEY_CHARS = 250


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
