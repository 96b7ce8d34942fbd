"""Inference on whole CT volumes, and the MLflow pyfunc that carries a model with its preprocessing.

The model metadata (`liverseg.json` beside the weights) holds everything inference needs: encoder,
input channels, HU window, standardisation mean/std, input size, classes, orientation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from liverseg.lits import from_canonical, to_canonical, to_hu_int16
from liverseg.metrics import largest_component
from liverseg.model import build_model
from liverseg.resize import resize_slices
from liverseg.transforms import standardise, window01

if TYPE_CHECKING:
    import nibabel as nib

META_FILE = "liverseg.json"
WEIGHTS_FILE = "weights.pt"
META_VERSION = 1


@dataclass
class LoadedModel:
    net: torch.nn.Module
    meta: dict[str, Any]
    device: torch.device


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: '{name}' is not a device; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here; use auto or cpu")
    return dev


def load_local(model_dir: str | Path, device: str = "auto") -> LoadedModel:
    """Load weights + metadata written by `save_local` (weights_only: no pickled code is run)."""
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / META_FILE).read_text())
    net = build_model(meta["encoder"], "none", meta["in_channels"], meta["decoder_channels"])
    net.load_state_dict(torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    dev = resolve_device(device)
    return LoadedModel(net.to(dev).eval(), meta, dev)


def save_local(model_dir: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, model_dir / WEIGHTS_FILE)
    (model_dir / META_FILE).write_text(json.dumps({"meta_version": META_VERSION, **meta}, indent=2))


def model_inputs(image_zhw: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """(Z, H, W) HU at model size -> (Z, C, H, W) standardised float, neighbours as channels if C=3."""
    x = standardise(window01(image_zhw, meta["window"]), meta["mean"], meta["std"])
    if meta["in_channels"] == 3:
        z = x.shape[0]
        idx = torch.arange(z, device=x.device)
        x = torch.stack([x[(idx - 1).clamp(0, z - 1)], x, x[(idx + 1).clamp(max=z - 1)]], 1)
    else:
        x = x[:, None]
    return x


@torch.no_grad()
def liver_probability(lm: LoadedModel, image_zhw: np.ndarray | torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Liver probability per slice: (Z, H, W) int16 HU at model size -> (Z, H, W) float32 on lm.device."""
    img = torch.as_tensor(image_zhw).to(lm.device)
    x = model_inputs(img, lm.meta)
    use_bf16 = lm.device.type == "cuda"
    out = []
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch].contiguous(memory_format=torch.channels_last)
        with torch.autocast(lm.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = lm.net(xb)
        out.append(logits.float().softmax(1)[:, 1])
    return torch.cat(out) if out else torch.zeros((0, *img.shape[1:]), device=lm.device)


class Timer(dict):
    """Seconds per named phase: `with timer("model"): ...` adds to timer["model"]."""

    def __call__(self, phase: str):
        import contextlib
        import time

        @contextlib.contextmanager
        def span():
            t0 = time.perf_counter()
            try:
                yield
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self[phase] = self.get(phase, 0.0) + time.perf_counter() - t0

        return span()


def segment_canonical(
    lm: LoadedModel, image_zyx: np.ndarray, lcc: bool = True, batch: int = 64, timer: Timer | None = None
) -> np.ndarray:
    """(Z, Y, X) int16 HU in canonical orientation, any in-plane size -> (Z, Y, X) uint8 liver mask."""
    timer = timer if timer is not None else Timer()
    with timer("preprocess"):
        small = resize_slices(image_zyx, tuple(lm.meta["size"]), is_mask=False, threads=torch.get_num_threads())
    with timer("model"):
        prob = liver_probability(lm, small, batch)
    with timer("postprocess"):
        if lcc:  # at model size: 16x fewer voxels than a 512x512 grid; zero the rest before resampling
            low = (prob > 0.5).cpu().numpy()
            if low.any():
                prob = prob * torch.from_numpy(largest_component(low)).to(prob.device)
        if prob.shape[1:] != image_zyx.shape[1:]:  # probabilities, not labels, are resampled back
            prob = F.interpolate(prob[:, None], size=image_zyx.shape[1:], mode="bilinear", align_corners=False)[:, 0]
        mask = (prob > 0.5).cpu().numpy()
    return mask.astype(np.uint8)


def segment_volume(
    lm: LoadedModel, volume: np.ndarray, affine: np.ndarray, lcc: bool = True, batch: int = 64
) -> np.ndarray:
    """A CT volume on its own grid, any orientation: (X, Y, Z) HU + 4x4 affine -> (X, Y, Z) uint8 mask."""
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D, got shape {volume.shape}")
    image, _ = to_canonical(to_hu_int16(np.asarray(volume)), np.asarray(affine, dtype=np.float64))
    return from_canonical(segment_canonical(lm, image, lcc, batch), affine)


def mask_nifti_bytes(mask_xyz: np.ndarray, header: nib.Nifti1Header, affine: np.ndarray, gz: bool = True) -> bytes:
    """A uint8 mask as NIfTI bytes on the grid of the image with `header` and `affine` (codes and zooms kept)."""
    import nibabel as nib
    from isal import igzip

    hdr = header.copy()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape(mask_xyz.shape)
    img = nib.Nifti1Image(mask_xyz.astype(np.uint8, copy=False), affine, header=hdr)
    img.header.set_slope_inter(1.0, 0.0)
    raw = img.to_bytes()
    return igzip.compress(raw, compresslevel=1, mtime=0) if gz else raw  # ISA-L: ~3x zlib's speed


def predict_file(
    lm: LoadedModel,
    src: str | Path,
    dst: str | Path,
    lcc: bool = True,
    overlay: str | Path | None = None,
    truth: str | Path | None = None,
) -> Timer:
    """Segment one NIfTI CT into a uint8 mask NIfTI with exactly the input's shape and affine.

    overlay: optional PNG of an axial and a coronal slice with the mask (and `truth`, a LiTS
    segmentation of the same grid, for comparison).
    """
    from liverseg.lits import CasePaths, read_case, read_volume
    from liverseg.storage import atomic_write_bytes

    timer = Timer()
    with timer("read"):
        vol = read_case(CasePaths("truth", Path(src), Path(truth))) if truth else read_volume(src)
    mask = segment_canonical(lm, vol.image, lcc, timer=timer)
    with timer("write"):
        out = from_canonical(mask, vol.affine).reshape(vol.shape)
        atomic_write_bytes(dst, mask_nifti_bytes(out, vol.header, vol.affine, gz=str(dst).endswith(".gz")))
    if overlay:
        from liverseg.plots import mask_overlay_png

        with timer("overlay"):
            mask_overlay_png(vol.image, mask, vol.spacing, lm.meta["window"], overlay, vol.mask, Path(src).name)
    return timer
