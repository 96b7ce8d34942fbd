"""One training step and one validation pass on a worker's device: the math of an epoch, apart from Ray.

`train_step` is what `benchmarks/train_step.py` times; `validate` sums per-case confusion counts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from liverseg.core.config import TrainConfig
from liverseg.model.artifact import ModelSpec, preprocess, use_bf16
from liverseg.model.transforms import random_affine, standardise, window01
from liverseg.training.batches import SliceSet


def validate(
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


def prepare_batch(
    img: torch.Tensor, msk: torch.Tensor, spec: ModelSpec, cfg: TrainConfig, gen
) -> tuple[torch.Tensor, torch.Tensor]:
    """A raw batch, (N, C, H, W) int16 HU and (N, H, W) uint8 labels on the device -> (inputs (N, C, H, W)
    float standardised, targets (N, H, W) int64 in {0, 1}): window, augment (when `cfg.data.augment`),
    standardise; the training side of `artifact.preprocess`, with augmentation between its two halves."""
    target = msk.long().clamp_(max=1)  # liver = label >= 1 (tumour is liver)
    x = window01(img, spec.window)
    if cfg.data.augment:
        x, target = random_affine(x, target, gen, cfg.data.rotate_deg, cfg.data.zoom)
    x = standardise(x, spec.mean, spec.std)
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, target


def train_step(
    model, opt, loss_fn, img: torch.Tensor, msk: torch.Tensor, spec: ModelSpec, cfg: TrainConfig, gen, bf16: bool
) -> torch.Tensor:
    """One training step from a raw batch (see `prepare_batch`); returns the detached loss.
    The training loop and `benchmarks/train_step.py` both call it."""
    x, target = prepare_batch(img, msk, spec, cfg, gen)
    return optimise(model, opt, loss_fn, x, target, bf16)
