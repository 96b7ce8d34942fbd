"""In-plane resizing of slice stacks: to the store's size at ingest, to the model's input at inference.

numpy and Pillow only (no torch, no zarr): ingest's spawned workers and the serving path import it.
"""

from __future__ import annotations

import numpy as np


def resize_slices(vol: np.ndarray, size: tuple[int, int], is_mask: bool, threads: int = 1) -> np.ndarray:
    """Resize (Z, H, W) in-plane to (Z, *size): antialiased bilinear for HU (int16), nearest for labels (uint8).

    HU slices go through Pillow's float resize (the filter torch's `antialias=True` reproduces, within
    1 HU of rounding), so ingest workers need no torch; `threads` > 1 resizes slices concurrently
    (Pillow releases the GIL). Labels use nearest-exact: source index floor((i + 0.5) * in / out).
    """
    h, w = size
    if vol.shape[1:] == (h, w):
        return vol
    if is_mask:
        rows = np.minimum(((np.arange(h) + 0.5) * vol.shape[1] / h).astype(np.intp), vol.shape[1] - 1)
        cols = np.minimum(((np.arange(w) + 0.5) * vol.shape[2] / w).astype(np.intp), vol.shape[2] - 1)
        return np.ascontiguousarray(vol[:, rows][:, :, cols], dtype=np.uint8)
    from PIL import Image

    out = np.empty((len(vol), h, w), np.float32)

    def one(z: int) -> None:
        out[z] = np.asarray(Image.fromarray(vol[z].astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))

    if threads > 1 and len(vol) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(len(vol))))
    else:
        for z in range(len(vol)):
            one(z)
    return np.clip(np.rint(out), -32768, 32767).astype(np.int16)
