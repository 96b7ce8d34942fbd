"""`liverseg train` on the CPU: Ray Train with 1 worker x N cores vs N workers x 1 core (same global
batch), against plain PyTorch steps on the same model, batch and threads. Prints JSON.

Throughput is `train_slices_per_s` as rank 0 logs it to MLflow (training steps only, validation
excluded), from the epochs after the first (warm-up).

    python benchmarks/scaling.py --cpus 2 --epochs 3 --steps 15
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

MODEL = ["model.encoder=resnet18", "model.encoder_weights=none", "model.decoder_channels=[32,16,16,8,8]"]


def plain_slices_per_s(size: int, batch: int, threads: int, steps: int) -> float:
    """The same U-Net, loss and Adam step on random tensors already in memory: no loader, no Ray."""
    import torch

    from liverseg.model.network import build_model
    from liverseg.training.losses import HybridLoss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_model("resnet18", "none", 1, [32, 16, 16, 8, 8]).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    loss_fn = HybridLoss(1.0, 1.0)
    x = torch.randn(batch, 1, size, size).to(memory_format=torch.channels_last)
    y = (torch.rand(batch, size, size) > 0.7).long()
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def liverseg_slices_per_s(
    store: str, workers: int, cpus: float, batch: int, epochs: int, steps: int, root: Path
) -> float:
    from mlflow.tracking import MlflowClient

    from liverseg.core.config import TrainConfig
    from liverseg.core.loading import load_config
    from liverseg.training.train import train

    sets = [
        *MODEL,
        f"train.epochs={epochs}",
        f"train.steps_per_epoch={steps}",
        f"train.batch_size={batch}",
        f"scaling.num_workers={workers}",
        f"scaling.cpus_per_worker={cpus}",
        f"run.name=scale-{workers}x{cpus}",
        f"run.storage_path={root / 'ray'}",
    ]
    res = train(store, load_config(TrainConfig, None, sets))
    hist = MlflowClient().get_metric_history(res.run_id, "train_slices_per_s")
    rates = [m.value for m in sorted(hist, key=lambda m: m.step)][1:]
    return sum(rates) / len(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch", type=int, default=16, help="global batch: split over the workers")
    p.add_argument("--size", type=int, default=64)
    a = p.parse_args()
    import ray

    from liverseg.core.config import IngestConfig
    from liverseg.data.ingest import ingest
    from liverseg.data.phantoms import write_phantoms

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        write_phantoms(root / "raw", cases=8, seed=2, shape=(96, 96, 40))
        store = str(root / "store.zarr")
        assert ingest(root / "raw", store, IngestConfig(size=(a.size, a.size), workers=a.cpus), progress=False).ok
        plain = plain_slices_per_s(a.size, a.batch, a.cpus, a.steps)
        ray.init(num_cpus=a.cpus, log_to_driver=False)
        one = liverseg_slices_per_s(store, 1, a.cpus, a.batch, a.epochs, a.steps, root)
        many = liverseg_slices_per_s(store, a.cpus, 1, a.batch // a.cpus, a.epochs, a.steps, root)
        ray.shutdown()
    print(
        json.dumps(
            {
                "cpus": a.cpus,
                "model": "resnet18 U-Net (decoder 32..8)",
                "size": a.size,
                "global_batch": a.batch,
                "plain_pytorch_slices_per_s": round(plain, 1),
                f"liverseg_1x{a.cpus}_slices_per_s": round(one, 1),
                f"liverseg_{a.cpus}x1_slices_per_s": round(many, 1),
                "liverseg_1_worker_to_plain": round(one / plain, 3),
                f"scaling_{a.cpus}_workers_to_1": round(many / one, 3),
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )


if __name__ == "__main__":
    main()
