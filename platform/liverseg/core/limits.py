"""Limits on work per input, in one place: every reader (ingest, predict, serve, score) checks the same
numbers, and `pipelines/serve.yaml` may lower the serving ones per replica."""

from __future__ import annotations

# LiTS volumes have at most ~1000 axial slices; twice that leaves room for thin-slice CT
MAX_SLICES = 2048
MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # a 512x512x1000 int16 volume, uncompressed
WEBHOOK_MAX_BYTES = 64 * 1024  # MLflow's alias payload is ~200 bytes
MAX_REASON = 1000  # characters of a promotion reason; MLflow caps a tag value at 5000
# rank 0's metric queue while the tracking server is unreachable: ~10^4 epochs of 8 metrics, ~20 MB
MAX_QUEUED_METRICS = 100_000
TRACKING_NOTICE_S = 10.0  # queued values older than this: the worker's log says the server is unreachable
TRACKING_FLUSH_S = 300.0  # at the end of training, how long rank 0 waits for the server to take the rest
