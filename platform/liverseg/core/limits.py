"""Limits on work per input, in one place: every reader (ingest, predict, serve, score) checks the same
numbers, and `pipelines/serve.yaml` may lower the serving ones per replica."""

from __future__ import annotations

# LiTS volumes have at most ~1000 axial slices; twice that leaves room for thin-slice CT
MAX_SLICES = 2048
MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # a 512x512x1000 int16 volume, uncompressed
# a NIfTI file read from disk (ingest, predict, score, evaluate --raw): at most a 512x512 CT of 1024 slices
# (every LiTS volume: 987 slices at most), counted from the header before any voxel array is made
MAX_VOXELS = 512 * 512 * 1024
MAX_FILE_BYTES = 4 * MAX_VOXELS + (1 << 20)  # decoded: that many float32 voxels, header and extensions
WEBHOOK_MAX_BYTES = 64 * 1024  # MLflow's alias payload is ~200 bytes
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
