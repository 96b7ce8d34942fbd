"""Typed stage configs, one model per stage (`pipelines/<stage>.yaml`); every default carries the reason
it was chosen (shown by `liverseg <stage> --help`). How a config is built from defaults, a profile, the
stage file and `--set` overrides is `loading`'s.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from liverseg.core.limits import (
    MAX_DECODED_BYTES,
    MAX_INPLANE,
    MAX_SLICES,
    MAX_UPLOAD_BYTES,
    MAX_VOXELS,
    VolumeLimits,
)


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


class TeamSection(Strict):
    max_trials_per_user: int = Field(
        2, ge=1, description="trials or training runs one person runs at once on a cluster; more wait for a slot"
    )


class TrainConfig(Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)
    team: TeamSection = Field(default_factory=TeamSection)


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


class ServeSection(Strict):
    poll_s: float = Field(
        30.0, ge=0, description="alias check interval, the fallback when a webhook is lost; 0 = webhook only"
    )
    retry_max_s: float = Field(
        600.0,
        gt=0,
        description="longest wait between loads of a version that failed (doubling from poll_s): no re-download every poll",
    )
    webhook_max_age_s: float = Field(
        300.0, gt=0, description="older signed deliveries are refused as replays (Standard Webhooks' 5 min)"
    )
    max_upload_mb: int = Field(
        MAX_UPLOAD_BYTES >> 20,
        ge=1,
        description="largest request body (MiB): a 512x512x1000 int16 NIfTI, uncompressed; more: 413",
    )
    max_decoded_mb: int = Field(
        MAX_DECODED_BYTES >> 20,
        ge=1,
        description="decompressed NIfTI per request (MiB), from its header: float32 512x512x1000; more: 413",
    )
    max_slices: int = Field(
        MAX_SLICES, ge=1, description="axial slices per volume; each is resized to the model size, more: 413"
    )
    max_inplane: int = Field(
        MAX_INPLANE, ge=8, description="pixels per in-plane axis (CT is 512, some 1024), from the header; more: 413"
    )
    max_voxels: int = Field(
        MAX_VOXELS, ge=1, description="voxels per volume (~13 bytes each while segmented), from the header; more: 413"
    )
    upload_timeout_s: float = Field(
        120.0, gt=0, description="a whole upload must arrive within this (512 MiB at ~5 MB/s); else 408"
    )
    body_idle_s: float = Field(
        10.0, gt=0, description="longest pause in a body, and the grace before min_upload_kib_s applies; else 408"
    )
    min_upload_kib_s: float = Field(
        64.0, ge=0, description="average body rate after body_idle_s (a trickle holds a socket); 0 = none; else 408"
    )
    max_bodies: int = Field(
        8, ge=1, description="upload-limit-sized bodies received and held at once over all requests (memory); more: 503"
    )
    max_client_bodies: int = Field(
        4,
        ge=1,
        description="upload-limit-sized bodies one client may hold at once: half the budget stays for others; more: 429",
    )
    max_client_uploads: int = Field(
        16, ge=1, description="requests one client may have sending or holding a body at once; more: 429"
    )
    trusted_proxies: list[str] = Field(
        default_factory=list, description="addresses (or CIDRs) whose X-Forwarded-For names the client; none: the peer"
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
    access_log: bool = Field(
        True, description="one JSON line per request on stdout (no volume content, no credentials)"
    )
    shadow: str | None = Field(
        None,
        description="a model URI (models:/NAME-candidates@challenger) that segments each request too, unseen; None: off",
    )
    shadow_queue: int = Field(
        4, ge=1, description="requests waiting for the shadow; more are answered but not shadowed (counted)"
    )
    shadow_queue_mb: int = Field(
        1024,
        ge=1,
        description="volume and champion mask held for the shadow at once (MiB; 3 bytes a voxel); more: not shadowed",
    )
    evidence_s: float = Field(
        300.0, gt=0, description="how often the shadow's agreement is written to MLflow (and at shutdown)"
    )

    def volume_limits(self) -> VolumeLimits:
        """The per-volume limits, named as serve.* keys in refusals."""
        mib = self.max_decoded_mb << 20
        return VolumeLimits(self.max_slices, self.max_inplane, self.max_voxels, mib, prefix="serve.")


class ServeConfig(Strict):
    serve: ServeSection = Field(default_factory=ServeSection)


# ---------------------------------------------------------------- promote
class PromoteSection(Strict):
    rule: Literal["superior", "non-inferior"] = Field(
        "superior", description="superior: the paired CI's lower bound above margin; non-inferior: above -margin"
    )
    margin: float = Field(
        0.0, description="Dice points; superior: 0 = better beyond noise; non-inferior: the loss accepted, e.g. 0.01"
    )
    min_dice: float = Field(0.9, ge=0, le=1, description="floor on the challenger's mean test Dice, champion or not")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="two-sided interval, the usual 95%")
    resamples: int = Field(
        10_000,
        ge=1000,
        le=200_000,
        description="bootstrap resamples: 13 cases, sd 0.01: the bounds move by < 0.0003 Dice between seeds",
    )
    seed: int = Field(0, description="bootstrap seed: the same scores give the same interval on every machine")


class PromoteConfig(Strict):
    promote: PromoteSection = Field(default_factory=PromoteSection)
