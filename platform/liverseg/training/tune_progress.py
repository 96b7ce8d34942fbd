"""What a search's driver tells people while it runs (imported by `tune` once Ray is wanted).

On the terminal (or a submitted job's log): a line when a trial starts, one per trial epoch, one when a
trial is stopped early (and why) or fails, and one when trials wait for a slot on the cluster (see
admission). On the search's MLflow parent run, what `liverseg jobs` and the MLflow UI show: trials done,
running and waiting, the best score so far, and `liverseg.job.state` (running, or waiting: why). Early-
stopped trials' runs are closed as they end (FINISHED, `trial_status: early-stopped`), not at the end.
MLflow writes and the slots' poll run in a thread of their own: Tune's loop never waits on a busy server.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from ray.tune import Callback

from liverseg.core.console import EpochView
from liverseg.tracking import tags
from liverseg.tracking.runs import find_run
from liverseg.training.tune_guard import STOP_REASONS

POLL_S = 5.0  # how often the driver asks the cluster's slots how its trials fare


@dataclass
class Watch:
    """The search the driver runs now: where its lines and its numbers go (`start()`, then `close()`)."""

    view: EpochView | None
    client: Any
    parent: str  # the search's MLflow parent run
    name: str  # tune.name: trial runs are keyed <name>/<trial id>
    experiment_id: str
    epochs: int
    job: str | None = None  # the key its trials ask the cluster's slots under, when on a cluster
    done: int = 0
    best: float | None = None
    state: str = ""
    counts: tuple[int, int] = (-1, -1)  # trials running, waiting: last logged
    why: str = ""  # last reason printed for waiting trials
    _todo: queue.Queue = field(default_factory=queue.Queue)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def say(self, text: str) -> None:
        if self.view:
            with self._lock:
                self.view.console.line(f"  {text}")

    def later(self, fn, *args) -> None:
        """`fn(*args)` in the watch's thread (MLflow writes: a busy server must not stall Tune's loop)."""
        self._todo.put((fn, args))

    def start(self) -> Watch:
        self._thread = threading.Thread(target=self._work, name="liverseg-search-watch", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s: float = 60.0) -> None:
        self._todo.put(None)
        if self._thread:
            self._thread.join(timeout_s)

    def _work(self) -> None:
        while True:
            try:
                item = self._todo.get(timeout=POLL_S)
            except queue.Empty:
                item = ()
            if item is None:
                return
            try:
                if item:
                    item[0](*item[1])
                elif self.job:
                    self._poll_slots()
            except Exception as e:  # a failed write costs a number in the UI, never the search
                print(f"[liverseg] progress not recorded: {type(e).__name__}: {e}", flush=True)

    def _poll_slots(self) -> None:
        import ray

        from liverseg.training.admission import slots_actor

        now = ray.get(slots_actor().summary.remote(self.job), timeout=30)
        counts = (now["running"], now["waiting"])
        if counts != self.counts:
            self.counts = counts
            self.client.log_metric(self.parent, tags.TRIALS_RUNNING, counts[0])
            self.client.log_metric(self.parent, tags.TRIALS_WAITING, counts[1])
        state = "running"
        if counts[1]:  # "waiting: why" makes `liverseg jobs` say PENDING; some running: RUNNING, with why
            state = f"waiting: {now['why']}" if not counts[0] else f"running; {counts[1]} waiting: {now['why']}"
        if state != self.state:
            self.state = state
            self.client.set_tag(self.parent, tags.JOB_STATE, state)
        if counts[1] and now["why"] != self.why:
            self.say(f"{counts[1]} trial(s) waiting for a slot: {now['why']}")
        self.why = now["why"] if counts[1] else ""

    def close_stopped(self, trial_id: str) -> None:
        """A pruned trial ran correctly: FINISHED now, told apart by its tag (as `tune._summarise` does)."""
        run = find_run(self.client, self.experiment_id, f"{self.name}/{trial_id}")
        if run is not None and run.info.status == "RUNNING" and not run.data.tags.get(tags.MODEL_URI):
            self.client.set_tag(run.info.run_id, tags.TRIAL_STATUS, "early-stopped")
            self.client.set_terminated(run.info.run_id, "FINISHED")


WATCHING: list[Watch] = []  # set by tune_search; a callback Tune restores from its saved state finds it here


def _params(config: dict) -> str:
    sampled = (config or {}).get("sampled", {})
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(sampled.items()))


class SearchProgress(Callback):
    """The Tune callback (in the driver) behind the lines and numbers above; stateless when pickled."""

    @staticmethod
    def _w() -> Watch | None:
        return WATCHING[-1] if WATCHING else None

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if w := self._w():
            w.say(f"trial {trial.trial_id} starts: {_params(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        w = self._w()
        if not w or "epoch" not in result:
            return
        if w.view:
            w.view.epoch(f"trial {trial.trial_id}", int(result["epoch"]), w.epochs, result)
        dice = result.get(tags.BEST_VAL_DICE, result.get("val_dice"))
        if isinstance(dice, (int, float)) and (w.best is None or dice > w.best):
            w.best = float(dice)
            w.later(w.client.log_metric, w.parent, tags.BEST_VAL_DICE, w.best)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        w = self._w()
        if not w:
            return
        ran = int((trial.last_result or {}).get("epoch", -1)) + 1
        if ran < w.epochs:
            why = STOP_REASONS.get(trial.trial_id, "stopped by the scheduler")
            w.say(f"trial {trial.trial_id} stopped early after epoch {ran}/{w.epochs}: {why}")
            w.later(w.close_stopped, trial.trial_id)
        else:
            best = (trial.last_result or {}).get(tags.BEST_VAL_DICE)
            shown = f": best val_dice {best:.4f}" if isinstance(best, (int, float)) else ""
            w.say(f"trial {trial.trial_id} finished {ran}/{w.epochs} epochs{shown}")
        self._ended(w, trial, ran)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        w = self._w()
        if not w:
            return
        ran = int((trial.last_result or {}).get("epoch", -1)) + 1
        w.say(f"trial {trial.trial_id} failed after {ran} epoch(s) (cause in the summary at the end)")
        self._ended(w, trial, ran)

    @staticmethod
    def _ended(w: Watch, trial, ran: int) -> None:
        if w.view:
            w.view.shrink(w.epochs - ran)
        w.done += 1
        w.later(w.client.log_metric, w.parent, tags.TRIALS_DONE, w.done)
        if w.job:
            from liverseg.training.admission import slots_actor

            slots_actor().release.remote(f"{w.job}/{trial.trial_id}")

    def __reduce__(self):  # Tune pickles its run config: restored, it finds the search in WATCHING
        return (SearchProgress, ())
