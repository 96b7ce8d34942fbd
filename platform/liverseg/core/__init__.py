"""core: what every room needs and nothing else: errors, typed configs, atomic files and digests, limits,
the `LIVERSEG_*` environment, UTC time stamps, the quiet console.

Imports no other room. Modules here other than `config` import neither torch, Ray, MLflow nor pydantic,
so that `data` (which runs in spawned ingest workers) can use them cheaply.
"""
