"""model: the network and everything needed to run it offline: the U-Net factory, the versioned spec
and weights (`artifact`), windowing and augmentation, inference on whole volumes, metrics, figures.

Imports `data` and `core`; never MLflow, Ray or zarr: a model loads and runs on a machine with none of them.
"""
