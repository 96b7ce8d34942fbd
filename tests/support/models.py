"""Real (untrained) models with known behaviour, logged and registered through the project's own code."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

SMALL_MODEL = {"encoder": "resnet18", "decoder_channels": [32, 16, 16, 8, 8]}
TINY = [  # training overrides: a ResNet-18 U-Net with a narrow decoder, no downloaded weights: seconds per epoch
    "model.encoder=resnet18",
    "model.encoder_weights=none",
    "model.decoder_channels=[32,16,16,8,8]",
    "train.batch_size=8",
]
TINY_SEARCH = [  # a 2-trial grid search of TINY models, seconds per trial
    *TINY,
    "train.epochs=3",
    "train.steps_per_epoch=2",
    "tune.search=grid",
    "tune.num_samples=2",
    "space={train.lr: {grid: [0.003, 1.0e-9]}}",  # a constructed case: half the trials cannot learn
]


def constant_state(liver: bool) -> dict[str, torch.Tensor]:
    """A U-Net whose head ignores its input: every voxel liver (True) or none (False)."""
    from liverseg.model.network import build_model

    net = build_model(SMALL_MODEL["encoder"], "none", 1, SMALL_MODEL["decoder_channels"])
    head = net.segmentation_head[0]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 10.0] if liver else [10.0, 0.0]))
    return net.state_dict()


def spec(size=(64, 64), in_channels: int = 1):
    """The spec of the small test U-Net."""
    from liverseg.model.artifact import ModelSpec

    return ModelSpec(
        encoder=SMALL_MODEL["encoder"],
        decoder_channels=tuple(SMALL_MODEL["decoder_channels"]),
        in_channels=in_channels,
        window=(-200.0, 250.0),
        mean=0.2,
        std=0.3,
        size=tuple(size),
    )


def log_model_run(
    state: dict, experiment: str = "liverseg", val_dice: float = 0.5, store_path: str = "", size=(64, 64)
) -> tuple[str, str]:
    """One finished MLflow run holding the model as the pyfunc training logs (model input `size`);
    returns (run id, model uri)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from liverseg.model.artifact import save_local
    from liverseg.tracking.models import log_model
    from liverseg.tracking.runs import experiment_id, tracking_uri

    client = MlflowClient(tracking_uri())
    run = client.create_run(
        experiment_id(client, experiment),
        tags={
            "git_commit": "abc123",
            "dvc_store_md5": "d41d8cd9",
            "store_path": store_path,
            "store_digest": "f" * 64,
            "config_hash": "cafe",
        },
    )
    rid = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=rid):
        save_local(Path(tmp) / "m", state, spec(size))
        info = log_model(Path(tmp) / "m")
    client.set_tag(rid, "model_uri", info.model_uri)
    client.set_tag(rid, "best_val_dice", str(val_dice))
    client.set_terminated(rid, "FINISHED")
    return rid, info.model_uri
