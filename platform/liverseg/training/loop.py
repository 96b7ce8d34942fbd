"""The per-worker training loop that Ray Train runs (importable: Ray ships it to worker processes).

Each worker holds its own share of training and validation cases in memory, trains with DDP (when
there is more than one worker), validates per case, and rank 0 checkpoints, reports and logs to MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from liverseg.core.config import TrainConfig
from liverseg.data.store import SliceStore
from liverseg.model.artifact import ModelSpec, use_bf16
from liverseg.model.metrics import overlap_scores
from liverseg.model.network import build_model
from liverseg.tracking import tags
from liverseg.tracking.logger import MetricLogger
from liverseg.tracking.runs import start_system_metrics
from liverseg.training.batches import DeviceBatches, SliceSet, epoch_indices
from liverseg.training.losses import HybridLoss
from liverseg.training.step import train_step, validate

STATE_FILE = "state.pt"
BEST_FILE = "best_model.pt"


@dataclass(frozen=True)
class LoopConfig:
    """What every worker gets from the driver (`train.train`); Ray pickles it to each worker process."""

    cfg: TrainConfig
    spec: ModelSpec
    store: str  # slice store path (absolute) or URL
    train_shares: list[list[str]]  # per rank, its training cases (balanced by slice count)
    train_slices: int  # training slices over all ranks
    val_cases: list[str]  # every validation case, in the order scores are gathered
    val_shares: list[list[str]]  # per rank, its validation cases
    tracking_uri: str | None = None
    run_id: str | None = None  # the MLflow run rank 0 logs to
    fail_at_epoch: int | None = None  # tests' injected crash (see `train._fault_injection`)
    fault_marker: str | None = None

    def to_ray(self) -> dict[str, Any]:
        """Ray Train's `train_loop_config` is a dict: this record under one key."""
        return {"loop": self}

    @staticmethod
    def from_ray(config: dict[str, Any]) -> LoopConfig:
        lc = config.get("loop")
        if not isinstance(lc, LoopConfig):
            raise TypeError(f"train_loop_config holds {type(lc).__name__}, not a LoopConfig")
        return lc


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def _inject_fault(marker: str | None) -> None:
    """Tests' fault injection: die mid-epoch once (a marker file remembers), as a crashed worker would."""
    if not marker or os.path.exists(marker):
        return
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    Path(marker).touch()
    time.sleep(2.0)  # let the controller register the previous epoch's checkpoint first
    os._exit(17)


@dataclass
class Worker:
    """What one Ray Train worker holds for a run: its data shares, model, optimiser and schedule."""

    cfg: TrainConfig
    spec: ModelSpec
    rank: int
    world: int
    device: torch.device
    train_set: SliceSet
    val_set: SliceSet
    val_pos: list[int]  # position of each of this worker's validation cases among all of them
    n_val: int
    model: Any
    opt: Any
    sched: Any
    loss_fn: Any
    batches: DeviceBatches
    steps: int  # optimiser steps per epoch, per worker
    bf16: bool


def _data(lc: LoopConfig, rank: int) -> tuple[SliceSet, SliceSet, list[int]]:
    """This worker's training and validation cases, in memory; positions of its validation cases."""
    store = SliceStore(lc.store)
    train_set = SliceSet(store, lc.train_shares[rank], lc.cfg.model.in_channels)
    my_val = lc.val_shares[rank]
    val_set = SliceSet(store, my_val, lc.cfg.model.in_channels)
    return train_set, val_set, [lc.val_cases.index(c) for c in my_val]


def _model_and_optimiser(cfg: TrainConfig, total_steps: int):
    """DDP-prepared (and optionally compiled) U-Net, its optimiser and lr schedule."""
    import ray.train.torch

    net = build_model(cfg.model.encoder, cfg.model.encoder_weights, cfg.model.in_channels, cfg.model.decoder_channels)
    if cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(net)
    if cfg.train.compile:
        model = torch.compile(model)
    opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
        if cfg.train.scheduler == "cosine"
        else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    )
    return model, opt, sched


def setup_worker(lc: LoopConfig) -> Worker:
    """Build this worker's state from the driver's loop config (see `train.train`)."""
    import ray.train
    import ray.train.torch

    cfg, spec = lc.cfg, lc.spec
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    train_set, val_set, val_pos = _data(lc, rank)
    batch = cfg.train.batch_size
    steps = cfg.train.steps_per_epoch or max(1, lc.train_slices // (batch * world))
    model, opt, sched = _model_and_optimiser(cfg, steps * cfg.train.epochs)
    loss_fn = HybridLoss(cfg.loss.ce_weight, cfg.loss.dice_weight)
    batches = DeviceBatches(train_set, device, batch)
    bf16 = use_bf16(device, spec.precision)
    n_val = len(lc.val_cases)
    return Worker(
        cfg, spec, rank, world, device, train_set, val_set, val_pos, n_val, model, opt, sched, loss_fn, batches,
        steps, bf16,
    )  # fmt: skip


@dataclass
class Best:
    """The best epoch so far: its validation Dice and weights (on the host)."""

    dice: float = -1.0
    epoch: int = -1
    state: dict[str, torch.Tensor] | None = None


def restore(w: Worker) -> tuple[int, Best]:
    """Resume from Ray's latest checkpoint, if any: (first epoch to run, best so far)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return 0, Best()
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        best = torch.load(Path(d) / BEST_FILE, map_location="cpu", weights_only=True)
    unwrap(w.model).load_state_dict(state["model"])
    w.opt.load_state_dict(state["optimizer"])
    w.sched.load_state_dict(state["scheduler"])
    print(f"[liverseg] rank {w.rank}: resumed after epoch {state['epoch']}", flush=True)
    return state["epoch"] + 1, Best(best["val_dice"], best["epoch"], best["model"])


def train_epoch(w: Worker, epoch: int, fault: tuple[int | None, str | None] = (None, None)) -> float:
    """One epoch of `w.steps` steps over seeded indices; returns the mean training loss over workers.

    fault: (epoch, marker) of the tests' injected crash (see `train._fault_injection`)."""
    cfg, batch = w.cfg, w.cfg.train.batch_size
    w.model.train()
    idx = epoch_indices(len(w.train_set), w.steps * batch, _seed(cfg.train.seed, epoch, w.rank))
    gen = torch.Generator(device=w.device).manual_seed(_seed(cfg.train.seed, epoch, w.rank, 1))
    loss_sum = torch.zeros((), device=w.device)
    for s in range(w.steps):
        img, msk = w.batches.get(idx[s * batch : (s + 1) * batch])
        loss_sum += train_step(w.model, w.opt, w.loss_fn, img, msk, w.spec, cfg, gen, w.bf16)
        w.sched.step()
        if fault[0] == epoch and w.rank == 0 and s == w.steps // 2:
            _inject_fault(fault[1])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loss_sum)
    return float(loss_sum) / (w.steps * w.world)


def epoch_metrics(w: Worker, train_loss: float, train_time: float) -> dict[str, float]:
    """Validate on every worker's cases (per-case scores, then their mean) and gather the epoch's metrics."""
    per_case = validate(unwrap(w.model), w.val_set, w.val_pos, w.n_val, w.cfg, w.spec, w.device, w.loss_fn)
    per_case = per_case.cpu().numpy()
    scores = [overlap_scores(tp, fp, fn) for tp, fp, fn in per_case[:, :3]]
    return {
        "train_loss": train_loss,
        "val_loss": float(per_case[:, 3].sum() / max(per_case[:, 4].sum(), 1)),
        "val_dice": float(np.mean([s["dice"] for s in scores])),
        "val_iou": float(np.mean([s["iou"] for s in scores])),
        "val_precision": float(np.mean([s["precision"] for s in scores])),
        "val_recall": float(np.mean([s["recall"] for s in scores])),
        "lr": float(w.opt.param_groups[0]["lr"]),
        "train_slices_per_s": w.steps * w.cfg.train.batch_size * w.world / train_time,
    }


def report(w: Worker, epoch: int, metrics: dict[str, float], best: Best, cfg_json: dict[str, Any]) -> None:
    """Report the epoch to Ray; rank 0 attaches the checkpoint (resume state + best weights so far)."""
    import ray.train
    from ray.train import Checkpoint

    payload = {**metrics, "epoch": epoch, "best_val_dice": best.dice}
    if w.rank != 0:
        ray.train.report(payload)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(
            {
                "model": unwrap(w.model).state_dict(),
                "optimizer": w.opt.state_dict(),
                "scheduler": w.sched.state_dict(),
                "epoch": epoch,
                "config": cfg_json,  # bf16 needs no loss scaler, so there is none to save
            },
            Path(d) / STATE_FILE,
        )
        torch.save({"model": best.state, "epoch": best.epoch, "val_dice": best.dice}, Path(d) / BEST_FILE)
        ray.train.report(payload, checkpoint=Checkpoint.from_directory(d))


def _record_nodes(w: Worker, logger: MetricLogger | None) -> None:
    """Tag the run with the node id of every rank (where the workers ran)."""
    import ray

    nodes = [ray.get_runtime_context().get_node_id()]
    if dist.is_available() and dist.is_initialized():
        nodes = [None] * w.world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if logger and logger.client:
        logger.client.set_tag(logger.run_id, tags.RAY_WORKER_NODES, ",".join(nodes))


def _system_metrics(w: Worker, lc: LoopConfig, resumed: bool):
    """Rank 0 samples its machine (CPU, memory, GPU) into the run: where the training runs, not the driver."""
    every = w.cfg.run.system_metrics_s
    if w.rank != 0 or not every:
        return None
    return start_system_metrics(lc.tracking_uri, lc.run_id, resumed, every)


def worker_loop(config: dict[str, Any]) -> dict[str, Any]:
    """What Ray Train runs on every worker: set up, resume, then per epoch train, validate, report.
    `config`: `LoopConfig.to_ray()`."""
    lc = LoopConfig.from_ray(config)
    w = setup_worker(lc)
    start, best = restore(w)
    logger = MetricLogger(lc.tracking_uri, lc.run_id) if w.rank == 0 else None
    _record_nodes(w, logger)
    monitor = _system_metrics(w, lc, resumed=start > 0)
    fault = (lc.fail_at_epoch, lc.fault_marker)
    try:
        for epoch in range(start, w.cfg.train.epochs):
            t0 = time.perf_counter()
            train_loss = train_epoch(w, epoch, fault)
            metrics = epoch_metrics(w, train_loss, time.perf_counter() - t0)
            if metrics["val_dice"] > best.dice:
                state = {k: v.detach().cpu().clone() for k, v in unwrap(w.model).state_dict().items()}
                best = Best(metrics["val_dice"], epoch, state)
            report(w, epoch, metrics, best, lc.cfg.model_dump(mode="json"))
            if logger:  # queued, never holding an epoch; with the best so far (ASHA's early stops rank by it)
                logger.log({**metrics, tags.BEST_VAL_DICE: best.dice}, step=epoch)
    except BaseException:
        if logger:  # the epochs that finished keep their metrics; the failure itself propagates
            with contextlib.suppress(Exception):
                logger.flush(timeout_s=30)
        raise
    if logger:
        logger.flush()  # waits (bounded) for the server to take what is still queued
    if monitor:
        monitor.finish()
    return {"best_val_dice": best.dice, "best_epoch": best.epoch, "epochs": w.cfg.train.epochs}
