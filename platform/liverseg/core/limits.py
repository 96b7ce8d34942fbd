"""Limits on work per input, in one place: every reader (ingest, predict, serve, score) checks the same
numbers, and `pipelines/serve.yaml` may lower the serving ones per replica."""

from __future__ import annotations

# LiTS volumes have at most ~1000 axial slices; twice that leaves room for thin-slice CT
MAX_SLICES = 2048
MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # a 512x512x1000 int16 volume, uncompressed
WEBHOOK_MAX_BYTES = 64 * 1024  # MLflow's alias payload is ~200 bytes
MAX_REASON = 1000  # characters of a promotion reason (a history record must fit one tag value, below)
# MLflow's SQL schema, which PostgreSQL enforces (SQLite does not): registered-model tag values and
# registered-model and version descriptions are varchar(5000), tag keys varchar(250)
MLFLOW_TAG_VALUE_CHARS = 5000
MLFLOW_DESCRIPTION_CHARS = 5000
MLFLOW_TAG_KEY_CHARS = 250
