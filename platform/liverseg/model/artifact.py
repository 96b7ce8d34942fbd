"""The model artifact: a typed, versioned spec + weights, how inputs are prepared for it, how its output
is cleaned up, and how a model folder is saved and loaded (MLflow's side is `tracking.models`).

On disk a model is a folder of two files: `weights.pt` (a state dict, read with
`torch.load(weights_only=True)`: no pickled code runs) and `liverseg.json` (the `ModelSpec` as JSON).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from liverseg.core.errors import ModelError, one_line
from liverseg.core.files import atomic_write_bytes
from liverseg.core.limits import MAX_METADATA_BYTES
from liverseg.model.metrics import largest_component
from liverseg.model.network import build_model
from liverseg.model.transforms import neighbour_index, standardise, window01

if TYPE_CHECKING:
    from liverseg.core.config import TrainConfig

FORMAT = "liverseg-model"
FORMAT_VERSION = 2  # 1: the untyped `meta` dict written before the spec (read and mapped, see `_from_v1`)
SPEC_FILE = "liverseg.json"
WEIGHTS_FILE = "weights.pt"
ARCHITECTURES = ("unet",)
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class ModelSpec:
    """Everything besides the weights that is needed to run a model on CT.

    Inputs: (N, in_channels, H, W) float, HU clipped to `window`, scaled to [0, 1], standardised by
    `mean`/`std` (the training split's), slices resampled to `size` (H, W) in RAS+ `orientation`;
    in_channels 3 = the slice and its two neighbours. Output: logits over `classes`.
    """

    encoder: str
    in_channels: int
    window: tuple[float, float]
    mean: float
    std: float
    size: tuple[int, int]
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    architecture: str = "unet"
    classes: tuple[str, ...] = ("background", "liver")
    orientation: str = "RAS"
    units: str = "HU"
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU (the rule of `use_bf16`)
    lcc: bool = True  # default post-processing: keep the largest connected component
    train_run_id: str = ""
    best_epoch: int = -1
    val_dice: float | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        problems = [
            (self.in_channels not in (1, 3), f"in_channels {self.in_channels} (valid: 1, 3)"),
            (self.architecture not in ARCHITECTURES, f"architecture '{self.architecture}' (valid: {ARCHITECTURES})"),
            (self.precision not in PRECISIONS, f"precision '{self.precision}' (valid: {', '.join(PRECISIONS)})"),
            (len(self.window) != 2 or self.window[0] >= self.window[1], f"window {list(self.window)}"),
            (len(self.size) != 2 or min(self.size) < 8, f"size {list(self.size)}"),
            (not self.std > 0, f"std {self.std}"),
            (self.orientation != "RAS" or self.units != "HU", f"orientation/units {self.orientation}/{self.units}"),
        ]
        bad = [msg for wrong, msg in problems if wrong]
        if bad:
            raise ModelError(f"model spec: invalid {'; '.join(bad)}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model spec") -> ModelSpec:
        """Read a spec of format version 2, or the version-1 `meta`; any other version is a ModelError."""
        if "format_version" not in d and d.get("meta_version") == 1:
            d = _from_v1(d)
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelError(
                f"{where}: model format version {version!r} is not supported (this liverseg reads 1 and "
                f"{FORMAT_VERSION}); load it with the liverseg version that wrote it"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - {"format"})
        if unknown:
            raise ModelError(f"{where}: unknown spec keys {unknown[:5]}; valid: {', '.join(sorted(fields))}")
        wrong = [k for k in fields if k in d and not _typed(_SPEC_TYPES[k], d[k])]
        if wrong:
            shown = json.dumps(d[wrong[0]])[:60]
            raise ModelError(f"{where}: spec {wrong[0]} {shown} is not {_SPEC_TYPES[wrong[0]]}")
        tuples = {k: tuple(d[k]) for k in ("window", "size", "decoder_channels", "classes") if k in d}
        try:
            return cls(**{k: v for k, v in d.items() if k != "format"} | tuples)
        except TypeError as e:
            raise ModelError(f"{where}: {e}") from None


# what each spec field's JSON value must be (a spec is read from the artifact store: checked before use)
_SPEC_TYPES = {
    **dict.fromkeys(("encoder", "architecture", "orientation", "units", "precision", "train_run_id"), "text"),
    **dict.fromkeys(("in_channels", "best_epoch", "format_version"), "an integer"),
    **dict.fromkeys(("mean", "std"), "a number"),
    "val_dice": "a number or null",
    "lcc": "true or false",
    "window": "2 numbers",
    "size": "2 integers",
    "decoder_channels": "5 positive integers",
    "classes": "2 names",
}


def _typed(want: str, v: Any) -> bool:
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def integer(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def items(n: int, ok) -> bool:
        return isinstance(v, (list, tuple)) and len(v) == n and all(ok(x) for x in v)

    return {
        "text": lambda: isinstance(v, str),
        "an integer": lambda: integer(v),
        "a number": lambda: number(v),
        "a number or null": lambda: v is None or number(v),
        "true or false": lambda: isinstance(v, bool),
        "2 numbers": lambda: items(2, number),
        "2 integers": lambda: items(2, integer),
        "5 positive integers": lambda: items(5, lambda x: integer(x) and x > 0),
        "2 names": lambda: items(2, lambda x: isinstance(x, str)),
    }[want]()


def _from_v1(meta: dict[str, Any]) -> dict[str, Any]:
    """The untyped metadata models were saved with before the spec (`meta_version` 1) -> spec fields."""
    keep = {"encoder", "in_channels", "window", "mean", "std", "size", "decoder_channels", "classes"}
    keep |= {"orientation", "units", "lcc", "train_run_id", "best_epoch", "val_dice"}
    return {k: v for k, v in meta.items() if k in keep} | {"format_version": FORMAT_VERSION}


def spec_for(cfg: TrainConfig, size: tuple[int, int], mean: float, std: float) -> ModelSpec:
    """The spec a training run with `cfg` produces, on a store of in-plane `size` with these statistics."""
    return ModelSpec(
        encoder=cfg.model.encoder,
        in_channels=cfg.model.in_channels,
        window=tuple(cfg.data.window),
        mean=float(mean),
        std=float(std),
        size=tuple(size),
        decoder_channels=tuple(cfg.model.decoder_channels),
        precision=cfg.train.precision,
    )


# ---------------------------------------------------------------- preprocessing and post-processing
def preprocess(hu: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """HU at model size, any shape (e.g. (N, C, H, W) int16) -> float32 standardised, same shape.

    The one input transform: training's validation, inference and the benchmarks call it (training
    itself windows, augments and then standardises, with the same two functions)."""
    return standardise(window01(hu, spec.window), spec.mean, spec.std)


def model_inputs(image_zhw: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """(Z, H, W) HU of one volume at model size -> (Z, C, H, W) standardised float."""
    index = torch.from_numpy(neighbour_index(image_zhw.shape[0], spec.in_channels)).to(image_zhw.device)
    return preprocess(image_zhw[index], spec)


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Mixed precision rule for training and inference: bf16 autocast on CUDA unless fp32 is asked for."""
    return device.type == "cuda" and precision != "fp32"


def keep_largest_component(prob_zhw: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Zero the probabilities outside the largest 3-D connected component of `prob > threshold`.

    (Z, H, W) float -> same; at model size this costs 16x fewer voxels than on a 512x512 grid."""
    low = (prob_zhw > threshold).cpu().numpy()
    if not low.any():
        return prob_zhw
    return prob_zhw * torch.from_numpy(largest_component(low)).to(prob_zhw.device)


# ---------------------------------------------------------------- the loaded model
@dataclass
class LoadedModel:
    net: torch.nn.Module
    spec: ModelSpec
    device: torch.device
    uri: str = ""  # where it came from; for a registry version, pinned as models:/NAME/N
    version: Any = None  # the MLflow ModelVersion, when loaded from the registry
    sha256: dict[str, str] | None = None  # for a registry version: the checked digests of the files loaded


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ModelError(f"--device: '{name}' is not a device; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA device here; use auto or cpu")
    return dev


@torch.no_grad()
def liver_probability(lm: LoadedModel, image_zhw: np.ndarray | torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Liver probability per slice: (Z, H, W) int16 HU at model size -> (Z, H, W) float32 on lm.device."""
    img = torch.as_tensor(image_zhw).to(lm.device)
    x = model_inputs(img, lm.spec)
    bf16 = use_bf16(lm.device, lm.spec.precision)
    out = []
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch].contiguous(memory_format=torch.channels_last)
        with torch.autocast(lm.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = lm.net(xb)
        out.append(logits.float().softmax(1)[:, 1])
    return torch.cat(out) if out else torch.zeros((0, *img.shape[1:]), device=lm.device)


# ---------------------------------------------------------------- a model folder
def save_local(model_dir: str | Path, state_dict: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    """Write `weights.pt` and `liverseg.json` into `model_dir` (each atomically)."""
    import io

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
    atomic_write_bytes(Path(model_dir) / WEIGHTS_FILE, buf.getvalue())
    atomic_write_bytes(Path(model_dir) / SPEC_FILE, (json.dumps(spec.to_dict(), indent=2) + "\n").encode())


def read_spec(path: str | Path) -> ModelSpec:
    """The spec in a model folder; anything unreadable (too large, not JSON, fields of the wrong type) is one
    ModelError naming the file."""
    try:
        if Path(path).stat().st_size > MAX_METADATA_BYTES:
            raise OSError(f"larger than {MAX_METADATA_BYTES} bytes")
        d = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise ModelError(f"{path}: unreadable model spec ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{path}: unreadable model spec ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise ModelError(f"{path}: model spec must be a JSON object")
    return ModelSpec.from_dict(d, str(path))


def load_local(model_dir: str | Path, device: str = "auto") -> LoadedModel:
    """Load a model folder written by `save_local` (weights_only: no pickled code is run)."""
    model_dir = Path(model_dir)
    spec = read_spec(model_dir / SPEC_FILE)
    try:
        net = build_model(spec.encoder, "none", spec.in_channels, spec.decoder_channels)
    except ModelError:
        raise
    except Exception as e:  # smp refusing the spec's numbers
        raise ModelError(f"{model_dir / SPEC_FILE}: no network of this spec ({one_line(e)})") from None
    try:
        state = torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as e:  # a truncated, foreign or mismatched file: one line, not a traceback
        raise ModelError(f"{model_dir / WEIGHTS_FILE}: unusable weights ({type(e).__name__})") from None
    dev = resolve_device(device)
    return LoadedModel(net.to(dev).eval(), spec, dev, str(model_dir))
