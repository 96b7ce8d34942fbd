"""serving: models answering requests. The REST app (routes, the model holder that follows an alias,
back-pressure, the server), MLflow webhook signatures, batch prediction of files.

Imports `tracking`, `model`, `data`, `core`; never Ray or zarr, nor its siblings `training` and `registry`.
"""
