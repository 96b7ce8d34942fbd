"""Typed stage configs loaded from `pipelines/*.yaml`, a named profile, and `--set key=value` overrides.

Every default carries the reason it was chosen. Precedence, lowest first: defaults (here) < the named
profile's section (pipelines/profiles.yaml) < the stage file (pipelines/<stage>.yaml) < `--set`.
Values given with `--set` are parsed as YAML, keys are dotted paths (`train.lr=3e-4`,
`split.fractions=[0.8,0.1,0.1]`); an unknown key is an error that suggests the closest and lists the
valid ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from liverseg.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- ingest
class SplitConfig(Strict):
    seed: int = Field(0, description="fixed seed: the same cases land in the same split on every machine")
    fractions: tuple[float, float, float] = Field((0.7, 0.2, 0.1), description="train/val/test by volume, as the paper")

    @field_validator("fractions")
    @classmethod
    def _sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"must be three non-negative numbers summing to 1, got {list(v)}")
        return v


class IngestConfig(Strict):
    size: tuple[int, int] = Field((128, 128), description="in-plane size (H, W), the paper's 128x128")
    split: SplitConfig = Field(default_factory=SplitConfig, description="split by volume")
    workers: int = Field(2, ge=1, description="volumes decoded in parallel; a laptop has a few cores")
    shard_slices: int = Field(
        256, ge=1, description="slices per shard file: a LiTS volume becomes 1-4 files, cheap for DVC"
    )

    @field_validator("size")
    @classmethod
    def _positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 8:
            raise ValueError(f"must be two sizes >= 8, got {list(v)}")
        return v


# ---------------------------------------------------------------- train
class ModelConfig(Strict):
    encoder: str = Field("resnet50", description="the paper's ResNet-50 encoder")
    encoder_weights: str = Field(
        "imagenet", description="'imagenet' (needs a network once), 'none', or a local .pt/.pth file"
    )
    in_channels: Literal[1, 3] = Field(1, description="1 = one slice; 3 = the slice and its two neighbours")
    decoder_channels: tuple[int, int, int, int, int] = Field(
        (256, 128, 64, 32, 16), description="smp's default U-Net decoder; halve it for CPU demos (1.6x faster)"
    )


class DataConfig(Strict):
    window: tuple[float, float] = Field((-200.0, 250.0), description="HU window around liver tissue")
    augment: bool = Field(True, description="flips, small rotations and zooms, as the paper")
    rotate_deg: float = Field(15.0, ge=0, description="max rotation; abdomen orientation varies little")
    zoom: tuple[float, float] = Field((0.9, 1.1), description="zoom range; patient size varies ~10%")
    norm_sample_slices: int = Field(2048, ge=16, description="slices sampled for mean/std: stable to 1e-3")

    @field_validator("window")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] >= v[1]:
            raise ValueError(f"must be [low, high] with low < high HU, got {list(v)}")
        return v


class TrainLoopConfig(Strict):
    epochs: int = Field(5, ge=1, description="the paper trains 5 epochs")
    batch_size: int = Field(16, ge=1, description="the paper's batch size (per worker)")
    lr: float = Field(1e-3, gt=0, description="Adam's usual rate; tuned by Ray Tune")
    weight_decay: float = Field(0.0, ge=0, description="the paper uses plain Adam")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="the paper uses Adam")
    scheduler: Literal["cosine", "none"] = Field("cosine", description="decays lr to 0 over the run")
    seed: int = Field(0, description="weights, sampling and augmentation are reproducible")
    steps_per_epoch: int | None = Field(None, ge=1, description="None: one pass over the training split")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    channels_last: bool = Field(True, description="faster convolutions on tensor cores")
    compile: bool = Field(False, description="torch.compile: ~1.4x on GPU, slow start on CPU")
    val_batch_size: int = Field(64, ge=1, description="inference needs no gradients: larger batches")


class LossConfig(Strict):
    ce_weight: float = Field(1.0, ge=0, description="hybrid loss, equal weights as the paper")
    dice_weight: float = Field(1.0, ge=0, description="hybrid loss, equal weights as the paper")

    @model_validator(mode="after")
    def _not_both_zero(self) -> LossConfig:
        if self.ce_weight == 0 and self.dice_weight == 0:
            raise ValueError("ce_weight and dice_weight cannot both be 0")
        return self


class ScalingSection(Strict):
    num_workers: int = Field(1, ge=1, description="data-parallel workers (one per GPU)")
    use_gpu: bool = Field(False, description="a laptop has none; set true on a GPU box")
    cpus_per_worker: float = Field(1.0, gt=0, description="a worker's loader and step need one core")


class RunSection(Strict):
    name: str | None = Field(None, description="None: derived from config hash; same name resumes")
    experiment: str = Field("liverseg", description="one MLflow experiment for the project")
    storage_path: str | None = Field(None, description="None: ./ray_results (absolute); s3:// on clusters")
    max_failures: int = Field(2, ge=-1, description="worker crashes survived, resuming from checkpoint")
    ray_address: str | None = Field(None, description="None: RAY_ADDRESS or a local Ray")
    worker_start_timeout_s: float = Field(
        300.0, gt=0, description="a worker group must start within this; Ray's 60 s is short on a busy machine"
    )
    start_retries: int = Field(
        2, ge=0, description="worker-group start failures retried before the run fails (Ray: forever)"
    )
    system_metrics_s: float | None = Field(
        10.0, gt=0, description="CPU/memory/GPU sampled into the MLflow run every N s (MLflow's default); None: off"
    )


class TrainConfig(Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)


# ---------------------------------------------------------------- tune
class TuneSection(Strict):
    num_samples: int = Field(8, ge=1, description="trials; ASHA stops the bad ones early")
    max_concurrent: int = Field(2, ge=1, description="trials at once; one per GPU or two per laptop")
    search: Literal["random", "grid", "optuna"] = Field("random", description="no extra assumptions")
    scheduler: Literal["asha", "none"] = Field("asha", description="stops bad trials on val Dice early")
    metric: str = Field("val_dice", description="the paper's model-selection metric")
    mode: Literal["max", "min"] = Field("max", description="higher Dice is better")
    grace_period: int = Field(1, ge=1, description="epochs every trial gets before ASHA may stop it")
    reduction_factor: int = Field(2, ge=2, description="ASHA keeps the best 1/2 at each rung")
    cpus_per_trial: float = Field(0.01, gt=0, description="the trial driver only waits on its workers")
    name: str = Field("liverseg-tune", description="Tune experiment folder and MLflow parent run name")


class TuneConfig(TrainConfig):
    tune: TuneSection = Field(default_factory=TuneSection)
    space: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {
            "train.lr": {"loguniform": [1e-4, 1e-2]},
            "loss.dice_weight": {"uniform": [0.2, 2.0]},
            "loss.ce_weight": {"uniform": [0.2, 2.0]},
        },
        description="training keys to distributions; lr and the Dice/CE weights as the brief says",
    )


# ---------------------------------------------------------------- serve
# LiTS volumes have at most ~1000 axial slices; twice that leaves room for thin-slice CT
MAX_SLICES = 2048


class ServeSection(Strict):
    poll_s: float = Field(
        30.0, ge=0, description="alias check interval, the fallback when a webhook is lost; 0 = webhook only"
    )
    webhook_max_age_s: float = Field(
        300.0, gt=0, description="older signed deliveries are refused as replays (Standard Webhooks' 5 min)"
    )
    upload_timeout_s: float = Field(
        120.0, gt=0, description="a whole upload must arrive within this (512 MiB at ~5 MB/s); else 408"
    )
    max_slices: int = Field(
        MAX_SLICES, ge=1, description="axial slices per volume; each is resized to the model size, more: 413"
    )
    max_bodies: int = Field(
        8, ge=1, description="upload-limit-sized bodies buffered at once over all requests (memory); more: 503"
    )
    max_queued: int = Field(8, ge=0, description="requests waiting for the 2 model slots; more get 503 at once")
    queue_timeout_s: float = Field(
        60.0, gt=0, description="longest wait for a model slot (a 512x512x1000 CT takes ~30 s on CPU); then 503"
    )
    max_connections: int = Field(
        200, ge=1, description="open connections (uvicorn limit_concurrency), under the usual ulimit -n 256; more: 503"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection must send its request headers within this, else it is closed"
    )


class ServeConfig(Strict):
    serve: ServeSection = Field(default_factory=ServeSection)


Cfg = TypeVar("Cfg", bound=BaseModel)


def valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """All dotted keys of a config model, leaves only."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += valid_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def did_you_mean(word: str, choices: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def set_dotted(tree: dict[str, Any], key: str, value: Any, model: type[BaseModel]) -> None:
    """Set `a.b.c` in a nested dict, refusing keys the model does not have."""
    parts = key.split(".")
    node_model: type[BaseModel] | None = model
    node = tree
    for i, part in enumerate(parts):
        fields = node_model.model_fields if node_model else {}
        if node_model is not None and part not in fields:
            keys = valid_keys(model)
            raise ConfigError(f"unknown key '{key}'{did_you_mean(key, keys)}; valid keys: {', '.join(keys)}")
        last = i == len(parts) - 1
        if last:
            node[part] = value
            return
        ann = fields[part].annotation if node_model else None
        node_model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any]]:
    """`["a.b=1", "c=[1,2]"]` -> [("a.b", 1), ("c", [1, 2])]; values are YAML."""
    pairs = []
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got '{item}'")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value is not YAML: {str(e).splitlines()[0]}") from e
        pairs.append((key.strip(), value))
    return pairs


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _flatten(tree: dict[str, Any], model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """Leaves of a nested dict as dotted pairs; free-form dict fields (like `space`) stay whole."""
    pairs = []
    for k, v in tree.items():
        field = model.model_fields.get(k)
        ann = field.annotation if field else None
        if isinstance(v, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
            pairs += [(f"{prefix}{k}.{kk}", vv) for kk, vv in _flatten(v, ann)]
        else:
            pairs.append((f"{prefix}{k}", v))
    return pairs


PRECEDENCE = "defaults < profile < stage file < --set"  # the one rule, in README and --help


def default_profile(pipelines: str | Path = "pipelines") -> str | None:
    """The profile named in `pipelines/profile.yaml` (the one switch), or None without that file."""
    path = Path(pipelines) / "profile.yaml"
    return str(_read_yaml(path).get("profile") or "") or None if path.exists() else None


def _profile_layer(profile: str, ppath: Path, stage: str | None) -> dict[str, Any]:
    profiles = _read_yaml(ppath)
    if profile not in profiles:
        raise ConfigError(
            f"{ppath}: unknown profile '{profile}'{did_you_mean(profile, list(profiles))}; valid: {', '.join(profiles)}"
        )
    return (profiles[profile] or {}).get(stage or "", {}) or {}


def load_config(
    model: type[Cfg],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    profile: str | None = None,
    profiles_path: str | Path | None = None,
    stage: str | None = None,
) -> Cfg:
    """Build a config: defaults < profile section for `stage` < YAML stage file < `--set` overrides.

    The stage file is what the user edits (`dvc exp run -S pipelines/tune.yaml:train.epochs=2`), so it
    wins over the profile, except where it says null (the profile's value, or the default); the profile picks the machine (demo laptop, paper GPU box). Raises ConfigError
    with one line naming the key and where its value came from (`--set`, the file, the profile).
    """
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    layers: list[tuple[str, dict[str, Any]]] = []
    if profile:
        ppath = Path(profiles_path or Path(path or "pipelines/x").parent / "profiles.yaml")
        layers.append((f"profile '{profile}' ({ppath}: {profile}.{stage})", _profile_layer(profile, ppath, stage)))
    if path:
        layers.append((str(path), _read_yaml(Path(path))))
    # null in a stage file means "the profile's value": the file can name every key a user may set with
    # `dvc exp run -S` (DVC only overrides keys that exist) without taking them from the profile
    staged = [(w, [(k, v) for k, v in _flatten(lay, model) if v is not None or w != str(path)]) for w, lay in layers]
    for where, pairs in [*staged, ("--set", parse_overrides(overrides))]:
        try:
            for key, value in pairs:
                set_dotted(tree, key, value, model)
                sources[key] = where
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        where = next((w for k, w in sources.items() if loc == k or loc.startswith(f"{k}.")), "defaults")
        raise ConfigError(f"{where}: {loc}: {err['msg']} (got {err.get('input')!r})") from None


def describe_keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, one-line reason) for every leaf of a config model, for `--help`."""
    rows: list[tuple[str, Any, str]] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe_keys(ann, f"{prefix}{name}.")
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((f"{prefix}{name}", default, field.description or ""))
    return rows


def to_flat_dict(cfg: BaseModel) -> dict[str, Any]:
    """Dotted leaves of a config, for MLflow params and hashing."""
    return dict(_flatten(cfg.model_dump(mode="json"), type(cfg)))
