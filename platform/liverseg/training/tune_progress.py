"""What a search's driver tells people while it runs (imported by `tune` once Ray is wanted).

On the terminal (or a submitted job's log): a line when a trial starts, one per trial epoch, one when a
trial is stopped early (and why) or fails, and one when trials wait for a slot on the cluster (see
admission). On the search's MLflow parent run, what `liverseg jobs` and the MLflow UI show: trials done,
running and waiting, the best score so far, and `liverseg.job.state` (running, or waiting: why). Early-
stopped trials' runs are closed as they end (FINISHED, `trial_status: early-stopped`), not at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback

from liverseg.core.console import EpochView
from liverseg.tracking import tags
from liverseg.tracking.runs import find_run
from liverseg.training.tune_guard import STOP_REASONS

POLL_S = 5.0  # how often the driver asks the cluster's slots how its trials fare


@dataclass
class Watch:
    """The search the driver runs now: where its lines and its numbers go."""

    view: EpochView | None
    client: Any
    parent: str  # the search's MLflow parent run
    name: str  # tune.name: trial runs are keyed <name>/<trial id>
    experiment_id: str
    epochs: int
    job: str | None = None  # the Ray job id, when its trials ask the cluster's slots
    done: int = 0
    best: float | None = None
    state: str = ""
    counts: tuple[int, int] = (-1, -1)  # trials running, waiting: last logged
    why: str = ""  # last reason printed for waiting trials


WATCHING: list[Watch] = []  # set by tune_search; a callback Tune restores from its saved state finds it here


def _params(config: dict) -> str:
    sampled = (config or {}).get("sampled", {})
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(sampled.items()))


class SearchProgress(Callback):
    """The Tune callback (in the driver) behind the lines and numbers above; stateless when pickled."""

    def __init__(self) -> None:
        self._polled = 0.0

    @staticmethod
    def _w() -> Watch | None:
        return WATCHING[-1] if WATCHING else None

    def _say(self, text: str) -> None:
        w = self._w()
        if w and w.view:
            w.view.console.line(f"  {text}")

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._say(f"trial {trial.trial_id} starts: {_params(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        w = self._w()
        if not w or "epoch" not in result:
            return
        if w.view:
            w.view.epoch(f"trial {trial.trial_id}", int(result["epoch"]), w.epochs, result)
        dice = result.get(tags.BEST_VAL_DICE, result.get("val_dice"))
        if isinstance(dice, (int, float)) and (w.best is None or dice > w.best):
            w.best = float(dice)
            w.client.log_metric(w.parent, tags.BEST_VAL_DICE, w.best)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        w = self._w()
        if not w:
            return
        ran = int((trial.last_result or {}).get("epoch", -1)) + 1
        if ran < w.epochs:
            why = STOP_REASONS.get(trial.trial_id, "stopped by the scheduler")
            self._say(f"trial {trial.trial_id} stopped early after epoch {ran}/{w.epochs}: {why}")
            self._close_stopped(w, trial.trial_id)
        else:
            best = (trial.last_result or {}).get(tags.BEST_VAL_DICE)
            shown = f": best val_dice {best:.4f}" if isinstance(best, (int, float)) else ""
            self._say(f"trial {trial.trial_id} finished {ran}/{w.epochs} epochs{shown}")
        self._ended(w, trial, ran)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        w = self._w()
        if not w:
            return
        ran = int((trial.last_result or {}).get("epoch", -1)) + 1
        self._say(f"trial {trial.trial_id} failed after {ran} epoch(s) (cause in the summary at the end)")
        self._ended(w, trial, ran)

    def _ended(self, w: Watch, trial, ran: int) -> None:
        if w.view:
            w.view.shrink(w.epochs - ran)
        w.done += 1
        w.client.log_metric(w.parent, tags.TRIALS_DONE, w.done)
        if w.job:
            from liverseg.training.admission import slots_actor

            slots_actor().release.remote(f"{w.job}/{trial.trial_id}")

    @staticmethod
    def _close_stopped(w: Watch, trial_id: str) -> None:
        """A pruned trial ran correctly: FINISHED now, told apart by its tag (as `tune._summarise` does)."""
        run = find_run(w.client, w.experiment_id, f"{w.name}/{trial_id}")
        if run is not None and run.info.status == "RUNNING" and not run.data.tags.get(tags.MODEL_URI):
            w.client.set_tag(run.info.run_id, tags.TRIAL_STATUS, "early-stopped")
            w.client.set_terminated(run.info.run_id, "FINISHED")

    def on_step_end(self, iteration, trials, **info) -> None:
        w = self._w()
        if not w or not w.job or time.monotonic() - self._polled < POLL_S:
            return
        self._polled = time.monotonic()
        import ray

        from liverseg.training.admission import slots_actor

        now = ray.get(slots_actor().summary.remote(w.job))
        counts = (now["running"], now["waiting"])
        if counts != w.counts:
            w.counts = counts
            w.client.log_metric(w.parent, tags.TRIALS_RUNNING, counts[0])
            w.client.log_metric(w.parent, tags.TRIALS_WAITING, counts[1])
        state = f"waiting: {now['why']}" if counts[1] and not counts[0] else "running"
        if state != w.state:
            w.state = state
            w.client.set_tag(w.parent, tags.JOB_STATE, state)
        if counts[1] and now["why"] != w.why:
            self._say(f"{counts[1]} trial(s) waiting for a slot: {now['why']}")
        w.why = now["why"] if counts[1] else ""

    def __reduce__(self):  # Tune pickles its run config: restored, it finds the search in WATCHING
        return (SearchProgress, ())
