"""liverseg: train, tune, track, register and serve liver-segmentation models for abdominal CT."""

__version__ = "0.1.0"
