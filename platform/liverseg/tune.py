"""Tune: Ray Tune over training keys (lr, Dice/CE weights, ...); each trial is a Ray Train run.

Ray Train V2 pattern: a Tune function trainable that builds and fits a TorchTrainer, with
`TuneReportCallback` forwarding each epoch's report to Tune (so ASHA can stop bad trials). MLflow has
one parent run for the search and one child run per trial, keyed by trial id (a retried or resumed
trial continues its own run: no duplicates).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from liverseg.config import ConfigError, TrainConfig, TuneConfig, did_you_mean, set_dotted, valid_keys
from liverseg.console import EpochView, root_cause
from liverseg.report import describe_search
from liverseg.storage import atomic_write_json
from liverseg.tracking import RUN_KEY, author, check_tracking, experiment_id, find_run, tracking_uri
from liverseg.tracking import client as mlflow_client

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid", "randint")
SEARCHES = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "none")


@dataclass
class TuneSummary:
    parent_run_id: str
    metric: str
    mode: str
    trials: list[dict[str, Any]] = field(default_factory=list)  # sorted best first

    @property
    def best(self) -> dict[str, Any]:
        """The best trial that logged a model (an early-stopped one cannot be registered)."""
        return next((t for t in self.trials if t["model_uri"]), self.trials[0])


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

    from liverseg.tune_guard import LastEpochKeptASHA

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
    from liverseg.errors import TrainError
    from liverseg.tune_guard import placeable_trials

    workers = cfg.scaling.num_workers
    need = {"CPU": cfg.tune.cpus_per_trial + workers * cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        need["GPU"] = float(workers)
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
    """One trial: a full Ray Train run (Ray imports this by module path)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from liverseg.train import train

    os.environ["MLFLOW_TRACKING_URI"] = config["tracking_uri"]  # trial actors may predate the driver's env
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(config["base"], config["sampled"])
    cfg.run.name = f"{config['name']}-{trial_id}"
    cfg.run.storage_path = f"{config['storage']}/trials"
    train(
        config["store"],
        cfg,
        run_key=f"{config['name']}/{trial_id}",
        parent_run_id=config["parent_run_id"],
        callbacks=[TuneReportCallback()],
        lineage=config.get("lineage"),  # absent in searches started by an older version
        check_first=False,  # the search's driver checked; a trial's node may have no GPU of its own
    )


def _parent_run(client, cfg: TuneConfig, resume: bool, lineage: dict[str, str]) -> str:
    exp = experiment_id(client, cfg.run.experiment)
    key = f"tune/{cfg.tune.name}"
    run = find_run(client, exp, key)
    if run is not None and resume:
        client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    run = client.create_run(
        exp, run_name=cfg.tune.name, tags={RUN_KEY: key, "liverseg.kind": "tune", "mlflow.user": author(), **lineage}
    )
    rid = run.info.run_id
    client.log_param(rid, "search", cfg.tune.search)
    client.log_param(rid, "scheduler", cfg.tune.scheduler)
    client.log_param(rid, "num_samples", cfg.tune.num_samples)
    client.log_param(rid, "metric", f"{cfg.tune.metric} ({cfg.tune.mode})")
    client.log_dict(rid, cfg.space, "search_space.json")
    client.log_dict(rid, cfg.model_dump(mode="json"), "tune_config.json")
    return rid


def progress_callback(view: EpochView, epochs: int):
    """A Tune callback (runs in the driver) feeding each trial's epoch reports to the terminal's view."""
    from ray.tune import Callback

    class TuneProgress(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "epoch" in result:
                view.epoch(f"trial {trial.trial_id}", int(result["epoch"]), epochs, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            view.shrink(epochs - int((trial.last_result or {}).get("epoch", -1)) - 1)  # early-stopped

        def on_trial_error(self, iteration, trials, trial, **info):
            self.on_trial_complete(iteration, trials, trial)
            view.console.line(f"  trial {trial.trial_id} failed (cause in the summary below)")

        def __reduce__(self):  # Tune pickles its run config: restored, this is a do-nothing callback
            return (Callback, ())

    return TuneProgress()


def _new_tuner(trainable, cfg: TuneConfig, search, param_space: dict[str, Any], root: str, view: EpochView | None):
    """A new search: Ray's Tuner over `param_space` with the configured search and scheduler; stopped
    trials' reservations are released as they end (see tune_guard)."""
    from ray import tune

    from liverseg.tune_guard import ReleaseStoppedTrials

    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=cfg.tune.num_samples,
            search_alg=search,
            scheduler=make_scheduler(cfg),
        ),  # concurrency is limited by the search algorithm (see make_search)
        run_config=tune.RunConfig(
            name=cfg.tune.name,
            storage_path=root,
            callbacks=[ReleaseStoppedTrials()] + ([progress_callback(view, cfg.train.epochs)] if view else []),
        ),
    )


def tune_search(
    store_path: str,
    cfg: TuneConfig,
    resume: bool = False,
    results_path: str | Path = "tune-results.json",
    view: EpochView | None = None,
) -> TuneSummary:
    """Run (or resume) a search; writes `results_path` (JSON for DVC) and returns trials best-first.

    `view`: the terminal's progress view, one line per trial epoch (new searches only).
    """
    from ray import tune

    from liverseg.store import SliceStore
    from liverseg.train import ensure_ray, lineage_tags, preflight, storage_path

    uri = tracking_uri()
    check_tracking(uri)
    if "://" not in store_path:
        store_path = str(Path(store_path).resolve())
    space = build_space(cfg.space)
    # git commit and DVC hash are read here, in the project directory: trials run in their own
    lineage = lineage_tags(SliceStore(store_path), store_path)
    client = mlflow_client(uri)
    root = storage_path(cfg)
    exp_dir = f"{root.rstrip('/')}/{cfg.tune.name}"
    preflight(cfg)
    ensure_ray(cfg.run.ray_address)
    cfg = fit_concurrency(cfg)
    search = make_search(cfg, space)
    trainable = tune.with_resources(trial_fn, {"cpu": cfg.tune.cpus_per_trial})
    if resume and tune.Tuner.can_restore(exp_dir):
        parent = _parent_run(client, cfg, resume=True, lineage=lineage)
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        parent = _parent_run(client, cfg, resume=False, lineage=lineage)
        base = TrainConfig.model_validate(cfg.model_dump(include=set(TrainConfig.model_fields))).model_dump(mode="json")
        param_space = {
            "base": base,
            "sampled": space,
            "store": store_path,
            "name": cfg.tune.name,
            "storage": exp_dir,
            "parent_run_id": parent,
            "tracking_uri": uri,
            "lineage": lineage,
        }
        tuner = _new_tuner(trainable, cfg, search, param_space, root, view)
    grid = _fit(tuner, client, parent)
    summary = _summarise(client, cfg, grid, parent)
    _log_parent(client, parent, summary)
    describe_search(client, summary)
    atomic_write_json(results_path, _results_json(summary, cfg))
    return summary


def _fit(tuner, client, parent: str):
    """tuner.fit(), with Ctrl-C ending the search in seconds: the parent run and its running trials are
    marked KILLED, and the local Ray (with every trial) is shut down, before KeyboardInterrupt goes on."""
    import ray

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune's own handler waits for trials to wind down
    try:
        return tuner.fit()
    except KeyboardInterrupt:
        exp = client.get_run(parent).info.experiment_id
        running = client.search_runs(
            [exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'"
        )
        for run in [*running, client.get_run(parent)]:
            client.set_terminated(run.info.run_id, "KILLED")
        ray.shutdown()
        raise


def _summarise(client, cfg: TuneConfig, grid, parent: str) -> TuneSummary:
    exp = experiment_id(client, cfg.run.experiment)
    trials = []
    for res in grid:
        metrics = res.metrics or {}
        trial_id = metrics.get("trial_id") or Path(str(res.path)).name.split("_")[-2]
        run = find_run(client, exp, f"{cfg.tune.name}/{trial_id}")
        epochs = int(metrics.get("epoch", -1)) + 1
        run_id = run.info.run_id if run else None
        model_uri = run.data.tags.get("model_uri") if run else None
        if res.error is not None:
            status = "failed"
        elif epochs < cfg.train.epochs or not model_uri:  # completed means: a model to register
            status = "early-stopped"
        else:
            status = "completed"
        if run is not None:
            client.set_tag(run_id, "trial_status", status)
            # a pruned trial ran correctly: FINISHED, as Ray's and Optuna's MLflow loggers mark it (KILLED
            # would paint the scheduler's normal work red in the UI); the tag tells the two apart
            client.set_terminated(run_id, "FAILED" if status == "failed" else "FINISHED")
        sampled = dict((res.config or {}).get("sampled", {}))
        error = root_cause(res.error) if res.error is not None else None
        trials.append(
            {
                "trial_id": trial_id,
                "status": status,
                "epochs": epochs,
                "val_dice": float(metrics.get("best_val_dice", float("nan"))),
                "params": sampled,
                "run_id": run_id,
                "model_uri": model_uri,
                "checkpoint": metrics.get("checkpoint_path"),
                "error": error,
            }
        )
    sign = -1 if cfg.tune.mode == "max" else 1
    # best first; among equal scores a completed trial (one with a logged model) wins
    trials.sort(
        key=lambda t: (
            t["val_dice"] != t["val_dice"],
            sign * (t["val_dice"] if t["val_dice"] == t["val_dice"] else 0),
            t["model_uri"] is None,
        )
    )
    return TuneSummary(parent, cfg.tune.metric, cfg.tune.mode, trials)


def _log_parent(client, parent: str, summary: TuneSummary) -> None:
    best = summary.best
    client.log_metric(parent, "best_val_dice", best["val_dice"])
    client.set_tag(parent, "best_trial_id", best["trial_id"])
    client.set_tag(parent, "best_run_id", str(best["run_id"]))
    for k, v in best["params"].items():  # tags, not params: a resumed search may find a new best
        client.set_tag(parent, f"best.{k}", v)
    counts = {s: sum(t["status"] == s for t in summary.trials) for s in ("completed", "early-stopped", "failed")}
    for s, n in counts.items():
        client.log_metric(parent, f"trials_{s.replace('-', '_')}", n)
    client.set_terminated(parent, "FINISHED")


def _results_json(summary: TuneSummary, cfg: TuneConfig) -> dict[str, Any]:
    clean = lambda v: None if isinstance(v, float) and v != v else v  # noqa: E731  (JSON has no NaN)
    return {
        "metric": summary.metric,
        "mode": summary.mode,
        "parent_run_id": summary.parent_run_id,
        "best": {k: clean(v) for k, v in summary.best.items()},
        "best_val_dice": clean(summary.best["val_dice"]),
        "trials": [{k: clean(v) for k, v in t.items()} for t in summary.trials],
        "experiment": cfg.run.experiment,
    }


def format_table(summary: TuneSummary) -> str:
    keys = sorted({k for t in summary.trials for k in t["params"]})
    head = ["trial", "status", "epochs", "val_dice", *keys, "mlflow run"]
    rows = [
        [
            t["trial_id"],
            t["status"],
            str(t["epochs"]),
            f"{t['val_dice']:.4f}",
            *[
                f"{t['params'].get(k, ''):.4g}"
                if isinstance(t["params"].get(k), float)
                else str(t["params"].get(k, ""))
                for k in keys
            ],
            str(t["run_id"]),
        ]
        for t in summary.trials
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])
