"""Training data: each worker loads its own share of cases from the slice store into memory.

A whole case is one or a few shard reads, so loading is fast; batches are then gathered from memory
by index (int16, half the bytes of float) and moved to the training device, where windowing,
standardisation and augmentation run (see `transforms`).
"""

from __future__ import annotations

import numpy as np
import torch

from liverseg.data.store import SliceStore
from liverseg.model.transforms import neighbour_index, window01


def assign_cases(case_slices: dict[str, int], workers: int) -> list[list[str]]:
    """Split cases over workers with balanced slice counts (largest first, to the lightest worker)."""
    shares: list[list[str]] = [[] for _ in range(workers)]
    load = [0] * workers
    for case in sorted(case_slices, key=lambda c: (-case_slices[c], c)):
        i = int(np.argmin(load))
        shares[i].append(case)
        load[i] += case_slices[case]
    return shares


class SliceSet:
    """The slices of some cases in memory.

    image: (S, H, W) int16 HU; mask: (S, H, W) uint8; neighbours: (S, C) int64 indices of the slices that
    form each input (C = 1, or 3 for the slice and its neighbours, clamped inside its case).
    """

    def __init__(self, store: SliceStore, cases: list[str], in_channels: int = 1):
        images, masks, nbrs, owner = [], [], [], []
        offset = 0
        for k, case in enumerate(cases):
            img, msk = store.volume(case)
            z = img.shape[0]
            nb = neighbour_index(z, in_channels)
            images.append(img)
            masks.append(msk)
            nbrs.append(nb + offset)
            owner.append(np.full(z, k))
            offset += z
        h, w = store.size
        self.cases = list(cases)
        self.image = torch.from_numpy(np.concatenate(images) if images else np.zeros((0, h, w), np.int16))
        self.mask = torch.from_numpy(np.concatenate(masks) if masks else np.zeros((0, h, w), np.uint8))
        self.neighbours = torch.from_numpy(np.concatenate(nbrs) if nbrs else np.zeros((0, in_channels), np.int64))
        self.case_index = torch.from_numpy(np.concatenate(owner) if owner else np.zeros(0, np.int64))

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slices `idx` (B,) -> (image (B, C, H, W) int16 HU, mask (B, H, W) uint8)."""
        return self.image[self.neighbours[idx]], self.mask[idx]

    def case_slices(self, k: int) -> torch.Tensor:
        """Indices of the slices of the k-th case, in z order."""
        return torch.nonzero(self.case_index == k).flatten()


class DeviceBatches:
    """Batches of a SliceSet on the training device.

    On CUDA, slices are gathered into two pinned host buffers in turn and copied asynchronously, so the
    host runs ahead of the GPU (a gather from pageable memory would make every copy a synchronisation
    point). An event per buffer keeps a buffer from being refilled before its copy has finished.
    """

    def __init__(self, data: SliceSet, device: torch.device, batch: int):
        self.data, self.device = data, device
        self.cuda = device.type == "cuda"
        if self.cuda:
            c = data.neighbours.shape[1]
            h, w = data.image.shape[1:]
            self.bufs = [
                (
                    torch.empty((batch * c, h, w), dtype=torch.int16).pin_memory(),
                    torch.empty((batch, h, w), dtype=torch.uint8).pin_memory(),
                    torch.cuda.Event(),
                )
                for _ in range(2)
            ]
            self.turn = 0

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) slice indices -> (image (B, C, H, W) int16 HU, mask (B, H, W) uint8) on the device."""
        if not self.cuda:
            return self.data.batch(idx)
        img_buf, msk_buf, done = self.bufs[self.turn]
        self.turn ^= 1
        done.synchronize()
        n, c = len(idx), self.data.neighbours.shape[1]
        img = torch.index_select(self.data.image, 0, self.data.neighbours[idx].flatten(), out=img_buf[: n * c])
        msk = torch.index_select(self.data.mask, 0, idx, out=msk_buf[:n])
        img = img.view(n, c, *img.shape[1:]).to(self.device, non_blocking=True)
        msk = msk.to(self.device, non_blocking=True)
        done.record()
        return img, msk


def epoch_indices(n: int, count: int, seed: int) -> torch.Tensor:
    """`count` slice indices from permutations of range(n) (repeated as needed), seeded."""
    g = torch.Generator().manual_seed(seed)
    reps = -(-count // max(n, 1))
    return torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:count]


def norm_stats(
    store: SliceStore, cases: list[str], window: tuple[float, float], samples: int, seed: int
) -> tuple[float, float]:
    """Mean and std of windowed [0, 1] intensities over a seeded sample of the cases' slices."""
    rng = np.random.default_rng(seed)
    per_case = max(1, samples // max(len(cases), 1))
    vals = []
    for case in cases:
        z = store.num_slices(case)
        idx = np.sort(rng.choice(z, size=min(per_case, z), replace=False))
        vals.append(window01(torch.from_numpy(store.slices(case, idx)[0]), window).flatten())
    x = torch.cat(vals).double()
    return float(x.mean()), float(x.std())
