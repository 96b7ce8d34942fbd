"""The per-worker training loop that Ray Train runs (importable: Ray ships it to worker processes).

Each worker holds its own share of training and validation cases in memory, trains with DDP (when
there is more than one worker), validates per case, and rank 0 checkpoints, reports and logs to MLflow.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from liverseg.artifact import ModelSpec, preprocess, use_bf16
from liverseg.config import TrainConfig
from liverseg.data import DeviceBatches, SliceSet, epoch_indices
from liverseg.losses import HybridLoss
from liverseg.metrics import overlap_scores
from liverseg.model import build_model
from liverseg.store import SliceStore
from liverseg.transforms import random_affine, standardise, window01

STATE_FILE = "state.pt"
BEST_FILE = "best_model.pt"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


class MetricLogger:
    """Rank 0's MLflow writer: a failed write is kept and retried with the next epoch, never dropped."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.run_id, self.pending = run_id, []
        self.client = None
        if uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.flush(raise_on_error=False)

    def flush(self, raise_on_error: bool = True) -> None:
        if not self.pending or self.client is None:
            return
        try:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []
        except Exception as e:
            if raise_on_error:
                raise RuntimeError(f"MLflow: {len(self.pending)} metric values could not be written: {e}") from e
            print(f"[liverseg] MLflow write failed, will retry: {type(e).__name__}", flush=True)


def _validate(
    model, val_set: SliceSet, case_pos: list[int], n_cases: int, cfg: TrainConfig, spec: ModelSpec, device, loss_fn
) -> torch.Tensor:
    """Per-case (tp, fp, fn, loss_sum, slices) of this worker's validation cases, summed over workers.

    `model` must be the unwrapped module: DDP forwards sync buffers, and workers run unequal counts.
    """
    out = torch.zeros((n_cases, 5), dtype=torch.float64, device=device)
    bf16 = use_bf16(device, spec.precision)
    model.eval()
    with torch.no_grad():
        for k, pos in enumerate(case_pos):
            idx = val_set.case_slices(k)
            for i in range(0, len(idx), cfg.train.val_batch_size):
                img, msk = val_set.batch(idx[i : i + cfg.train.val_batch_size])
                img, msk = img.to(device), msk.to(device).long()
                x = preprocess(img, spec)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = model(x.contiguous(memory_format=torch.channels_last))
                pred, ref = logits.argmax(1) == 1, msk >= 1
                tp = (pred & ref).sum()
                out[pos] += torch.stack(
                    [
                        tp,
                        pred.sum() - tp,
                        ref.sum() - tp,
                        loss_fn(logits, (msk >= 1).long()) * len(img),
                        torch.tensor(len(img), device=device),
                    ]
                ).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(out)
    return out


def optimise(model, opt, loss_fn, x: torch.Tensor, target: torch.Tensor, bf16: bool) -> torch.Tensor:
    """One optimiser step on (N, C, H, W) inputs and (N, H, W) labels; returns the detached loss
    (kept on the device: no host sync per step)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    loss = loss_fn(logits, target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def _inject_fault(marker: str | None) -> None:
    """Tests' fault injection: die mid-epoch once (a marker file remembers), as a crashed worker would."""
    if not marker or os.path.exists(marker):
        return
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    Path(marker).touch()
    time.sleep(2.0)  # let the controller register the previous epoch's checkpoint first
    os._exit(17)


def worker_loop(config: dict[str, Any]) -> dict[str, Any]:
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = TrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    spec = ModelSpec.from_dict(config["spec"])
    store = SliceStore(config["store"])
    train_set = SliceSet(store, config["train_shares"][rank], cfg.model.in_channels)
    val_cases: list[str] = config["val_cases"]
    my_val = config["val_shares"][rank]
    val_set = SliceSet(store, my_val, cfg.model.in_channels)
    val_pos = [val_cases.index(c) for c in my_val]

    net = build_model(cfg.model.encoder, cfg.model.encoder_weights, cfg.model.in_channels, cfg.model.decoder_channels)
    if cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(net)
    if cfg.train.compile:
        model = torch.compile(model)
    opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    batch = cfg.train.batch_size
    batches = DeviceBatches(train_set, device, batch)
    steps = cfg.train.steps_per_epoch or max(1, config["train_slices"] // (batch * world))
    total = steps * cfg.train.epochs
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        if cfg.train.scheduler == "cosine"
        else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    )
    loss_fn = HybridLoss(cfg.loss.ce_weight, cfg.loss.dice_weight)
    bf16 = use_bf16(device, spec.precision)

    start, best_dice, best_epoch, best_state = 0, -1.0, -1, None
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
            best = torch.load(Path(d) / BEST_FILE, map_location="cpu", weights_only=True)
        unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, best_dice, best_epoch, best_state = state["epoch"] + 1, best["val_dice"], best["epoch"], best["model"]
        print(f"[liverseg] rank {rank}: resumed after epoch {state['epoch']}", flush=True)
    logger = MetricLogger(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else None
    nodes = [ray.get_runtime_context().get_node_id()]
    if dist.is_available() and dist.is_initialized():
        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if logger and logger.client:  # where the workers ran: one node id per rank
        logger.client.set_tag(logger.run_id, "ray_worker_nodes", ",".join(nodes))

    for epoch in range(start, cfg.train.epochs):
        t0 = time.perf_counter()
        model.train()
        idx = epoch_indices(len(train_set), steps * batch, _seed(cfg.train.seed, epoch, rank))
        gen = torch.Generator(device=device).manual_seed(_seed(cfg.train.seed, epoch, rank, 1))
        loss_sum = torch.zeros((), device=device)
        for s in range(steps):
            img, msk = batches.get(idx[s * batch : (s + 1) * batch])
            msk = msk.long().clamp_(max=1)
            x = window01(img, cfg.data.window)
            if cfg.data.augment:
                x, msk = random_affine(x, msk, gen, cfg.data.rotate_deg, cfg.data.zoom)
            x = standardise(x, spec.mean, spec.std)
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss_sum += optimise(model, opt, loss_fn, x, msk, bf16)
            sched.step()
            if cfg.run.fail_at_epoch == epoch and rank == 0 and s == steps // 2:
                _inject_fault(config.get("fault_marker"))
        train_time = time.perf_counter() - t0
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loss_sum)
        per_case = _validate(unwrap(model), val_set, val_pos, len(val_cases), cfg, spec, device, loss_fn).cpu().numpy()
        scores = [overlap_scores(tp, fp, fn) for tp, fp, fn in per_case[:, :3]]
        metrics = {
            "train_loss": float(loss_sum) / (steps * world),
            "val_loss": float(per_case[:, 3].sum() / max(per_case[:, 4].sum(), 1)),
            "val_dice": float(np.mean([s["dice"] for s in scores])),
            "val_iou": float(np.mean([s["iou"] for s in scores])),
            "val_precision": float(np.mean([s["precision"] for s in scores])),
            "val_recall": float(np.mean([s["recall"] for s in scores])),
            "lr": float(opt.param_groups[0]["lr"]),
            "train_slices_per_s": steps * batch * world / train_time,
        }
        if metrics["val_dice"] > best_dice:
            best_dice, best_epoch = metrics["val_dice"], epoch
            best_state = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
        report = {**metrics, "epoch": epoch, "best_val_dice": best_dice}
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save(
                    {
                        "model": unwrap(model).state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "epoch": epoch,
                        "config": config["cfg"],  # bf16 needs no loss scaler, so there is none to save
                    },
                    Path(d) / STATE_FILE,
                )
                torch.save({"model": best_state, "epoch": best_epoch, "val_dice": best_dice}, Path(d) / BEST_FILE)
                ray.train.report(report, checkpoint=Checkpoint.from_directory(d))
            logger.log(metrics, step=epoch)
        else:
            ray.train.report(report)
    if logger:
        logger.flush()
    return {"best_val_dice": best_dice, "best_epoch": best_epoch, "epochs": cfg.train.epochs}
