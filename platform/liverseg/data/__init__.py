"""data: the data plane. LiTS NIfTI files (read, validate, reorient to RAS+), the Zarr v3 slice store
(format, reader, ingest, publish to object storage) and synthetic phantoms.

Imports `core` only, and never torch, Ray, MLflow or pydantic: ingest runs it in spawned worker processes.
"""
