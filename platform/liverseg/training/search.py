"""A search's definition: the space (training keys to distributions), the search algorithm and scheduler
by name, how many trials fit at once, and the trial function Ray runs (each trial one Ray Train run).

Ray Train V2 pattern: a Tune function trainable that builds and fits a TorchTrainer, with
`TuneReportCallback` forwarding each epoch's report to Tune (so ASHA can stop bad trials).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from liverseg.core.config import TrainConfig, TuneConfig
from liverseg.core.errors import ConfigError
from liverseg.core.loading import did_you_mean, set_dotted, valid_keys

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid", "randint")


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares (the param space's fixed part; `sampled` holds the rest)."""

    base: dict[str, Any]  # the TrainConfig as JSON: every trial's starting point
    store: str  # slice store path (absolute) or URL
    name: str  # tune.name: trial runs are <name>-<trial id>, MLflow run keys <name>/<trial id>
    storage: str  # the search's Ray storage folder or URI; trials checkpoint under <storage>/trials
    parent_run_id: str  # the search's MLflow parent run
    tracking_uri: str
    lineage: dict[str, str]  # git commit, DVC hash, store digest: read in the project directory
    owner: str = ""  # who runs the search (the tracking login): whose slots its trials take
    slots: str | None = None  # on a cluster, the key its trials ask the cluster's slots under (admission)


def build_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{'train.lr': {'loguniform': [1e-4, 1e-2]}} -> Ray Tune domains; keys must be training keys."""
    from ray import tune

    keys = set(valid_keys(TrainConfig))
    out = {}
    for key, spec in space.items():
        if key not in keys:
            raise ConfigError(
                f"space: unknown training key '{key}'{did_you_mean(key, sorted(keys))}; valid: {', '.join(sorted(keys))}"
            )
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"space.{key}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
        kind, args = next(iter(spec.items()))
        if kind in ("loguniform", "uniform", "randint"):
            if not (isinstance(args, list) and len(args) == 2 and args[0] < args[1]):
                raise ConfigError(f"space.{key}.{kind}: expected [low, high] with low < high, got {args!r}")
            out[key] = getattr(tune, kind)(*args)
        elif kind == "choice":
            out[key] = tune.choice(list(args))
        else:
            out[key] = tune.grid_search(list(args))
    return out


def trial_count(num_samples: int, space: dict[str, dict[str, Any]]) -> int:
    """How many trials a search runs: Ray repeats every grid for each of the `num_samples` samples."""
    for spec in space.values():
        if isinstance(spec, dict) and isinstance(spec.get("grid"), list):
            num_samples *= len(spec["grid"])
    return num_samples


def make_search(cfg: TuneConfig, space: dict[str, Any]):
    """Search algorithm by name: random | grid (Ray's variant generator) or optuna (TPE)."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    grid = any(isinstance(v, dict) and "grid_search" in v for v in space.values())
    if cfg.tune.search == "optuna":
        if grid:
            raise ConfigError("tune.search=optuna cannot sample 'grid' distributions; use choice")
        from ray.tune.search.optuna import OptunaSearch

        algo = OptunaSearch(metric=cfg.tune.metric, mode=cfg.tune.mode, seed=cfg.train.seed)
        return ConcurrencyLimiter(algo, max_concurrent=cfg.tune.max_concurrent)
    if cfg.tune.search == "grid" and not grid:
        raise ConfigError("tune.search=grid needs at least one {grid: [...]} in space")
    return BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=cfg.tune.max_concurrent)


def make_scheduler(cfg: TuneConfig):
    """ASHA on the epoch count that never stops a trial at its last epoch (its model is logged after it)."""
    from ray.tune.schedulers import FIFOScheduler

    from liverseg.training.tune_guard import LastEpochKeptASHA

    if cfg.tune.scheduler == "none":
        return FIFOScheduler()
    return LastEpochKeptASHA(
        last_epoch=cfg.train.epochs,
        time_attr="training_iteration",
        metric=cfg.tune.metric,
        mode=cfg.tune.mode,
        max_t=cfg.train.epochs + 1,  # never reached: the last epoch is kept whatever the rungs
        grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
        reduction_factor=cfg.tune.reduction_factor,
    )


def fit_concurrency(cfg: TuneConfig) -> TuneConfig:
    """Cap `tune.max_concurrent` at what the cluster can place (each trial: its driver and its workers).

    More would leave a trial's worker group waiting for resources that never free (a hang); fewer
    than one is a one-line error.
    """
    from liverseg.core.errors import TrainError
    from liverseg.training.runtime import workers_need
    from liverseg.training.tune_guard import placeable_trials

    need = workers_need(cfg)
    need["CPU"] += cfg.tune.cpus_per_trial
    fits = placeable_trials(need)
    if fits < 1:
        raise TrainError(f"a trial needs {need} but the Ray cluster has too little: lower scaling.* or add nodes")
    if fits >= cfg.tune.max_concurrent:
        return cfg
    print(f"tune.max_concurrent {cfg.tune.max_concurrent} -> {fits}: the cluster places {fits} trial(s) of {need}")
    capped = cfg.model_copy(deep=True)
    capped.tune.max_concurrent = fits
    return capped


def trial_config(base: dict[str, Any], sampled: dict[str, Any]) -> TrainConfig:
    tree = json.loads(json.dumps(base))
    for key, value in sampled.items():
        set_dotted(tree, key, value, TrainConfig)
    return TrainConfig.model_validate(tree)


def trial_fn(config: dict[str, Any]) -> None:
    """One trial: a full Ray Train run (Ray imports this by module path). `config` is the param space,
    resolved: {"setup": TrialSetup, "sampled": {training key: value}}."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from liverseg.training.runtime import workers_need
    from liverseg.training.train import train

    setup: TrialSetup = config["setup"]
    os.environ["MLFLOW_TRACKING_URI"] = setup.tracking_uri  # trial actors may predate the driver's env
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(setup.base, config["sampled"])
    cfg.run.name = f"{setup.name}-{trial_id}"
    cfg.run.storage_path = f"{setup.storage}/trials"
    slot = None
    if setup.slots:  # on a cluster: a slot first, then the workers (see admission)
        from liverseg.training.admission import wait_for_slot

        key = f"{setup.slots}/{trial_id}"
        slot = wait_for_slot(key, setup.owner, setup.slots, workers_need(cfg), cfg.team.max_trials_per_user)
    try:
        train(
            setup.store,
            cfg,
            run_key=f"{setup.name}/{trial_id}",
            parent_run_id=setup.parent_run_id,
            callbacks=[TuneReportCallback()],
            lineage=setup.lineage,
            check_first=False,  # the search's driver checked; a trial's node may have no GPU of its own
        )
    finally:
        if slot is not None:
            slot.release()
