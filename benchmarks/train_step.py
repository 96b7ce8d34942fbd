"""Training throughput: liverseg's input path + step vs plain PyTorch on data already on the device.

Both sides in one process, same model (smp U-Net), batch, precision, channels_last and compile
setting, timed in alternating rounds (the median round ratio is reported). liverseg's side gathers
int16 slices from a SliceSet in (pinned) host memory, copies them to the device, and calls
`train_loop.train_step` (window, augment, standardise, step on the device), the function training
calls. Prints JSON.

    python benchmarks/train_step.py --encoder resnet50 --size 128 --batch 512 --steps 20 --rounds 5 [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch


class _MemStore:
    """An in-memory stand-in for SliceStore with the same `volume`/`size` interface (random HU)."""

    def __init__(self, cases: int, z: int, size: int):
        rng = np.random.default_rng(0)
        self.size = (size, size)
        self.data = {
            str(c): (
                rng.integers(-1000, 400, (z, size, size), dtype=np.int16),
                (rng.random((z, size, size)) > 0.7).astype(np.uint8),
            )
            for c in range(cases)
        }

    def volume(self, case):
        return self.data[case]


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _environment(args, dev: torch.device, bf16: bool) -> dict:
    return {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
        "encoder": args.encoder,
        "size": args.size,
        "batch": args.batch,
        "compile": args.compile,
        "precision": "bf16" if bf16 else "fp32",
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "torch_threads": torch.get_num_threads(),
        "cpus_available": len(os.sched_getaffinity(0)),
    }


def _sides(args, dev: torch.device, bf16: bool, out: dict):
    """The two step functions: plain PyTorch on device-resident random data, and liverseg's
    SliceSet in host memory -> device -> `train_loop.train_step` (window, augment, standardise, step)."""
    from liverseg.core.config import TrainConfig
    from liverseg.model.artifact import ModelSpec
    from liverseg.model.network import build_model
    from liverseg.training.batches import DeviceBatches, SliceSet, epoch_indices
    from liverseg.training.losses import HybridLoss
    from liverseg.training.step import optimise, prepare_batch, train_step

    B, S = args.batch, args.size
    loss_fn = HybridLoss()

    def make():
        torch.manual_seed(0)
        net = build_model(args.encoder, "none", 1).to(dev, memory_format=torch.channels_last)
        model = torch.compile(net) if args.compile else net
        return model, torch.optim.Adam(net.parameters(), lr=1e-4)

    plain_model, plain_opt = make()
    x = torch.randn(B, 1, S, S, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (B, S, S), device=dev)

    def plain_step(_i):
        optimise(plain_model, plain_opt, loss_fn, x, y, bf16)

    store = _MemStore(args.cases, args.slices_per_case, S)
    data = SliceSet(store, list(store.data), 1)
    t0 = time.perf_counter()
    idx = epoch_indices(len(data), B * 64, 0)
    for i in range(64):
        data.batch(idx[i * B : (i + 1) * B])
    out["loader_only_slices_per_s_one_core"] = B * 64 / (time.perf_counter() - t0)
    lv_model, lv_opt = make()
    spec = ModelSpec(args.encoder, 1, (-200.0, 250.0), 0.2, 0.3, (S, S))
    cfg = TrainConfig()  # augment and channels_last on, as training's defaults
    gen = torch.Generator(device=dev).manual_seed(0)
    idx = epoch_indices(len(data), B * (args.warmup + args.rounds * args.steps), 1)
    batches = DeviceBatches(data, dev, B)

    def lv_step(i):
        img, msk = batches.get(idx[i * B : (i + 1) * B])
        train_step(lv_model, lv_opt, loss_fn, img, msk, spec, cfg, gen, bf16)

    def input_path(i):  # train_step's input half alone: host time of issuing gather, copy and transforms
        img, msk = batches.get(idx[i * B : (i + 1) * B])
        prepare_batch(img, msk, spec, cfg, gen)

    return plain_step, lv_step, input_path


def run(args) -> dict:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = dev.type == "cuda"
    out = _environment(args, dev, bf16)
    plain_step, lv_step, input_path = _sides(args, dev, bf16, out)
    B = args.batch

    def timed(step, first: int) -> float:
        _sync(dev)
        t = time.perf_counter()
        for i in range(first, first + args.steps):
            step(i)
        _sync(dev)
        return B * args.steps / (time.perf_counter() - t)

    for i in range(args.warmup):
        plain_step(i)
        lv_step(i)
    # Alternate the two sides round by round, so that clock boost, thermal state or a noisy
    # neighbour affect both alike; the median round ratio is the figure.
    plain, lv = [], []
    for r in range(args.rounds):
        plain.append(timed(plain_step, 0))
        lv.append(timed(lv_step, args.warmup + r * args.steps))
    ratios = [b / a for a, b in zip(plain, lv)]
    out["plain_slices_per_s"] = statistics.median(plain)
    out["liverseg_slices_per_s"] = statistics.median(lv)
    out["ratio_liverseg_to_plain"] = statistics.median(ratios)
    out["ratio_min_max"] = [min(ratios), max(ratios)]
    _sync(dev)
    t = time.perf_counter()
    for i in range(args.steps):  # no sync inside: the host's share of the input path per step
        input_path(args.warmup + i)
    out["input_path_host_ms_per_step"] = 1e3 * (time.perf_counter() - t) / args.steps
    _sync(dev)
    out["liverseg_ms_per_step"] = 1e3 * B / out["liverseg_slices_per_s"]
    out["loader_to_gpu_ratio"] = out["loader_only_slices_per_s_one_core"] / out["plain_slices_per_s"]
    out["torch"] = torch.__version__
    out["date"] = time.strftime("%Y-%m-%d")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="resnet50")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="steps per round and side")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--slices-per-case", type=int, default=256)
    p.add_argument("--compile", action="store_true")
    print(json.dumps(run(p.parse_args())))


if __name__ == "__main__":
    main()
