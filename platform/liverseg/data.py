"""Training data: each worker loads its own share of cases from the slice store into (pinned) memory.

A whole case is one or a few shard reads, so loading is fast; batches are then gathered from memory
by index (int16, half the bytes of float) and moved to the training device, where windowing,
standardisation and augmentation run (see `transforms`).
"""

from __future__ import annotations

import numpy as np
import torch

from liverseg.store import SliceStore
from liverseg.transforms import window01


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

    def __init__(self, store: SliceStore, cases: list[str], in_channels: int = 1, pin: bool = False):
        images, masks, nbrs, owner = [], [], [], []
        offset = 0
        for k, case in enumerate(cases):
            img, msk = store.volume(case)
            z = img.shape[0]
            idx = np.arange(z)
            if in_channels == 3:
                nb = np.stack([np.clip(idx - 1, 0, z - 1), idx, np.clip(idx + 1, 0, z - 1)], 1)
            else:
                nb = idx[:, None]
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
        if pin and torch.cuda.is_available():
            self.image, self.mask = self.image.pin_memory(), self.mask.pin_memory()

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slices `idx` (B,) -> (image (B, C, H, W) int16 HU, mask (B, H, W) uint8)."""
        return self.image[self.neighbours[idx]], self.mask[idx]

    def case_slices(self, k: int) -> torch.Tensor:
        """Indices of the slices of the k-th case, in z order."""
        return torch.nonzero(self.case_index == k).flatten()


def epoch_indices(n: int, count: int, seed: int) -> torch.Tensor:
    """`count` slice indices from permutations of range(n) (repeated as needed), seeded."""
    g = torch.Generator().manual_seed(seed)
    reps = -(-count // max(n, 1))
    return torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:count]


def norm_stats(store: SliceStore, cases: list[str], window: tuple[float, float], samples: int, seed: int) -> tuple[float, float]:
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
