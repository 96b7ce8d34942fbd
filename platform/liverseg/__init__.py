"""liverseg: train, tune, track, register and serve liver-segmentation models for abdominal CT.

The package is a building of rooms, one per concern; a room imports only rooms below it (import-linter's
layers contract in pyproject.toml, checked by `make test`), siblings never import each other:

    cli                                 the `liverseg` command, one file per room
    training | registry | serving       Ray Train/Tune runs | evaluation, registry, governance | REST, predict
    tracking                            MLflow: runs, logged models, the tag vocabulary
    model                               the network, its spec and weights, inference, metrics, figures
    data                                LiTS NIfTI, the Zarr slice store, ingest, publish, phantoms
    core                                errors, typed config, files, limits, environment, console

Nothing happens at import: no directories, tracking URIs, logging setup or Ray contexts.
"""

__version__ = "0.2.0"
