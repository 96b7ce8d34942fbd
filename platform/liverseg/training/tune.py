"""Running a search: Ray Tune over training keys (lr, Dice/CE weights, ...), each trial a Ray Train run
(`search`). MLflow has one parent run for the search and one child run per trial, keyed by trial id (a
retried or resumed trial continues its own run: no duplicates); the results go to `tune-results.json`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from liverseg.core.config import TrainConfig, TuneConfig
from liverseg.core.console import EpochView, root_cause
from liverseg.core.errors import TrainError
from liverseg.tracking import tags
from liverseg.tracking.results import SearchResults, TrialResult, write_results
from liverseg.tracking.runs import author, check_tracking, experiment_id, find_run, tracking_uri, ui_url
from liverseg.tracking.runs import client as mlflow_client
from liverseg.training.credentials import SECRET_ENV
from liverseg.training.search import (
    TrialSetup,
    build_space,
    fit_concurrency,
    make_scheduler,
    make_search,
    trial_count,
    trial_fn,
)
from liverseg.training.tune_report import describe_search


def open_search_run(
    client, cfg: TuneConfig, resume: bool, lineage: dict[str, str], extra_tags: dict[str, str] | None = None
) -> str:
    """The search's MLflow parent run (key `tune/<tune.name>`): with `resume` the existing one, RUNNING
    again, else a new one with the search's settings as params and its space and config as artifacts.
    `liverseg tune --submit` opens it on the submitter's machine (`extra_tags`: the job's)."""
    exp = experiment_id(client, cfg.run.experiment)
    key = f"tune/{cfg.tune.name}"
    run = find_run(client, exp, key)
    if run is not None and resume:
        client.update_run(run.info.run_id, status="RUNNING")
        for k, v in (extra_tags or {}).items():
            client.set_tag(run.info.run_id, k, v)
        return run.info.run_id
    run_tags = {tags.RUN_KEY: key, tags.KIND: "tune", tags.MLFLOW_USER: author(), **lineage, **(extra_tags or {})}
    rid = client.create_run(exp, run_name=cfg.tune.name, tags=run_tags).info.run_id
    client.log_param(rid, "search", cfg.tune.search)
    client.log_param(rid, "scheduler", cfg.tune.scheduler)
    client.log_param(rid, "num_samples", cfg.tune.num_samples)
    client.log_param(rid, "metric", f"{cfg.tune.metric} ({cfg.tune.mode})")
    client.log_dict(rid, cfg.space, "search_space.json")
    client.log_dict(rid, cfg.model_dump(mode="json"), "tune_config.json")
    return rid


def _new_tuner(trainable, cfg: TuneConfig, search, param_space: dict[str, Any], root: str, scheduler):
    """A new search: Ray's Tuner over `param_space` with the configured search and scheduler; stopped
    trials' reservations are released as they end (see tune_guard), progress goes to WATCHING's view."""
    from ray import tune

    from liverseg.training.tune_guard import ReleaseStoppedTrials
    from liverseg.training.tune_progress import SearchProgress

    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(num_samples=cfg.tune.num_samples, search_alg=search, scheduler=scheduler),
        # concurrency is limited by the search algorithm (see make_search)
        run_config=tune.RunConfig(
            name=cfg.tune.name, storage_path=root, callbacks=[ReleaseStoppedTrials(), SearchProgress()]
        ),
    )


def _restore(exp_dir: str, trainable, client, cfg: TuneConfig):
    """Ray's saved search, unpickled. A search saved by liverseg 0.1 names modules 0.2 moved into rooms
    (liverseg.tune_guard, ...): one line says what to do instead of Ray's traceback."""
    from ray import tune

    try:
        return tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    except (ModuleNotFoundError, AttributeError) as e:
        missing = getattr(e, "name", None) or str(e)
        if "liverseg" not in missing:
            raise
        run = find_run(client, experiment_id(client, cfg.run.experiment), f"tune/{cfg.tune.name}")
        commit = (run.data.tags.get(tags.GIT_COMMIT) if run else None) or "COMMIT"
        raise TrainError(
            f"{exp_dir}: saved by an older liverseg (its state names {missing}, which this version moved): "
            f"finish it with the commit that started it (git checkout {commit.removesuffix('-dirty')} && make setup "
            f"&& liverseg tune --resume), or start a new search: --set tune.name=NEW"
        ) from None


def tune_search(
    store_path: str,
    cfg: TuneConfig,
    resume: bool = False,
    results_path: str | Path = "tune-results.json",
    view: EpochView | None = None,
    *,
    parent_run_id: str | None = None,
    lineage: dict[str, str] | None = None,
    job: str | None = None,
) -> SearchResults:
    """Run (or resume) a search; writes `results_path` (JSON for DVC) and returns trials best-first.

    `view`: the terminal's progress view (trial starts, epochs, early stops, waits; see tune_progress).
    A submitted search comes with its parent run and lineage opened on the submitter's machine
    (`parent_run_id`, `lineage`); `job` is its Ray job id. On a cluster its trials ask the cluster's
    slots (admission) before they start their workers.
    """
    from ray import tune

    from liverseg.data.store import SliceStore
    from liverseg.training.runtime import cluster_address, ensure_ray, lineage_tags, preflight, storage_path
    from liverseg.training.tune_progress import Watch

    uri = tracking_uri()
    check_tracking(uri)
    space = build_space(cfg.space)
    # git commit and DVC hash are read here, in the project directory: trials run in their own; every
    # trial reads the published store's version current now (pinned), whatever is published meanwhile
    store = SliceStore(store_path if "://" in store_path else str(Path(store_path).resolve()))
    store_path = store.pinned_url
    lineage = lineage or lineage_tags(store, store_path)
    client = mlflow_client(uri)
    root = storage_path(cfg)
    exp_dir = f"{root.rstrip('/')}/{cfg.tune.name}"
    preflight(cfg)
    on_cluster = cluster_address(cfg) is not None
    ensure_ray(cfg.run.ray_address)
    cfg = fit_concurrency(cfg)
    trainable = tune.with_resources(trial_fn, {"cpu": cfg.tune.cpus_per_trial})
    restoring = resume and tune.Tuner.can_restore(exp_dir)
    tuner = _restore(exp_dir, trainable, client, cfg) if restoring else None
    parent = parent_run_id or open_search_run(client, cfg, resume=restoring, lineage=lineage)
    client.update_run(parent, status="RUNNING")
    slots = (job or f"driver-{parent[:12]}") if on_cluster else None
    if tuner is None:
        base = TrainConfig.model_validate(cfg.model_dump(include=set(TrainConfig.model_fields))).model_dump(mode="json")
        setup = TrialSetup(base, store_path, cfg.tune.name, exp_dir, parent, uri, lineage, author(), slots)
        param_space = {"setup": setup, "sampled": space}
        tuner = _new_tuner(trainable, cfg, make_search(cfg, space), param_space, root, make_scheduler(cfg))
    exp = client.get_run(parent).info.experiment_id
    _announce(view, cfg, store_path, ui_url(parent, exp, uri) or f"run {parent} (mlflow ui --backend-store-uri {uri})")
    watch = Watch(view, client, parent, cfg.tune.name, exp, cfg.train.epochs, slots)
    grid = _fit(tuner, client, parent, watch)
    summary = _summarise(client, cfg, grid, parent)
    _log_parent(client, parent, summary)
    describe_search(client, summary)
    write_results(results_path, summary)
    return summary


def _announce(view: EpochView | None, cfg: TuneConfig, store_path: str, link: str) -> None:
    """The search's first line: what runs on what, and its MLflow page."""
    if view:
        trials = trial_count(cfg.tune.num_samples, cfg.space)
        view.console.line(
            f"search {cfg.tune.name}: {trials} trials x {cfg.train.epochs} epochs on {store_path}; MLflow {link}"
        )


def _keep_secrets_sealed() -> None:
    """Ray Tune copies the driver's AWS_* variables into every trial actor's runtime_env in clear, which
    Ray's runtime-env agent writes to its log: liverseg's workers get them from the job's sealed variables
    (setup hook) or, on a local Ray, from the environment they inherit, so Tune's copy is left out."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = class_cache.ENV_VARS_TO_PROPAGATE - {*SECRET_ENV, "AWS_ACCESS_KEY_ID"}


def _fit(tuner, client, parent: str, watch):
    """tuner.fit() with `watch` (tune_progress) reporting, the search's slots freed when it ends, and Ctrl-C
    (or a job's stop) ending it in seconds: the parent run and its running trials are marked KILLED and
    the local Ray (with every trial) shut down, before KeyboardInterrupt goes on."""
    import ray

    from liverseg.training.tune_progress import WATCHING

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune's own handler waits for trials to wind down
    _keep_secrets_sealed()
    WATCHING.append(watch.start())
    try:
        return tuner.fit()
    except KeyboardInterrupt:
        exp = client.get_run(parent).info.experiment_id
        running = client.search_runs(
            [exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'"
        )
        for run in [*running, client.get_run(parent)]:
            client.set_terminated(run.info.run_id, "KILLED")
        client.set_tag(parent, tags.JOB_STATE, "stopped")
        _release(watch.job)
        ray.shutdown()
        raise
    finally:  # its last MLflow writes land before the summary's; a stopped search waits on none
        WATCHING.pop().close(timeout_s=5 if sys.exc_info()[0] else 60)
        _release(watch.job)


def _release(slots: str | None) -> None:
    """Free every slot the search's trials hold (each frees its own; one that died unseen would hold it a minute)."""
    import ray

    if slots and ray.is_initialized():
        from liverseg.training.admission import slots_actor

        slots_actor().release_job.remote(slots)


def _summarise(client, cfg: TuneConfig, grid, parent: str) -> SearchResults:
    exp = experiment_id(client, cfg.run.experiment)
    trials = []
    for res in grid:
        metrics = res.metrics or {}
        trial_id = metrics.get("trial_id") or Path(str(res.path)).name.split("_")[-2]
        run = find_run(client, exp, f"{cfg.tune.name}/{trial_id}")
        epochs = int(metrics.get("epoch", -1)) + 1
        run_id = run.info.run_id if run else None
        model_uri = run.data.tags.get(tags.MODEL_URI) if run else None
        if res.error is not None:
            status = "failed"
        elif epochs < cfg.train.epochs or not model_uri:  # completed means: a model to register
            status = "early-stopped"
        else:
            status = "completed"
        if run is not None:
            client.set_tag(run_id, tags.TRIAL_STATUS, status)
            # a pruned trial ran correctly: FINISHED, as Ray's and Optuna's MLflow loggers mark it (KILLED
            # would paint the scheduler's normal work red in the UI); the tag tells the two apart
            client.set_terminated(run_id, "FAILED" if status == "failed" else "FINISHED")
        sampled = dict((res.config or {}).get("sampled", {}))
        error = root_cause(res.error) if res.error is not None else None
        trials.append(
            TrialResult(
                trial_id,
                status,
                epochs,
                float(metrics.get(tags.BEST_VAL_DICE, float("nan"))),
                sampled,
                run_id,
                model_uri,
                metrics.get("checkpoint_path"),
                error,
            )
        )
    sign = -1 if cfg.tune.mode == "max" else 1
    # best first; among equal scores a completed trial (one with a logged model) wins
    trials.sort(key=lambda t: (not t.scored, sign * t.val_dice if t.scored else 0, t.model_uri is None))
    return SearchResults(parent, cfg.tune.metric, cfg.tune.mode, cfg.run.experiment, trials)


def _log_parent(client, parent: str, summary: SearchResults) -> None:
    best = summary.best
    client.log_metric(parent, tags.BEST_VAL_DICE, best.val_dice)
    client.set_tag(parent, tags.BEST_TRIAL_ID, best.trial_id)
    client.set_tag(parent, tags.BEST_RUN_ID, str(best.run_id))
    for k, v in best.params.items():  # tags, not params: a resumed search may find a new best
        client.set_tag(parent, f"{tags.BEST_PARAM_PREFIX}{k}", v)
    counts = {s: sum(t.status == s for t in summary.trials) for s in ("completed", "early-stopped", "failed")}
    for s, n in counts.items():
        client.log_metric(parent, f"trials_{s.replace('-', '_')}", n)
    client.set_terminated(parent, "FINISHED")
