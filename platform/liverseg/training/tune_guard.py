"""What keeps a search from hanging or losing a model (imported by `tune` once Ray is wanted).

Why searches hung: each trial runs a Ray Train V2 controller that reserves its workers in a placement
group. When ASHA stops a trial, Tune ends the trial's actor and the controller dies with it, but the
placement group outlives its creator until the *job* ends (GCS frees it only when creator actor and
job are both dead). Ray Train leaves the clean-up to a detached actor that polls the State API, which
stalls or fails on a busy machine or without the dashboard; meanwhile the next trial's worker group
cannot be placed, times out after 60 s, and its controller retries forever. And two concurrent
trials each needing `cpus_per_trial + workers x cpus_per_worker` CPUs (2.02 on 2 cores) can never
both place. Hence: release orphaned placement groups from the driver, run no more trials at once than
fit, bound the retries, and give slow machines a longer start-up timeout.
"""

from __future__ import annotations

import math
import time

import ray
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

NIL_ACTOR = b"\xff"  # ActorID.nil() is all 0xff bytes: the creator was a driver, not an actor
STOP_REASONS: dict[str, str] = {}  # trial id -> why ASHA stopped it (the driver's progress view reads it)


class LastEpochKeptASHA(ASHAScheduler):
    """ASHA that never stops a trial at (or after) its last epoch: its model is logged after that report.

    With `max_t` above the epoch count, ASHA still puts a rung at the last epoch whenever the count is
    grace x factor^k (2, 4, 8 epochs with the defaults), and a trial stopped there ends without a model.
    """

    def __init__(self, last_epoch: int, **kwargs):
        super().__init__(**kwargs)
        self._last_epoch = last_epoch

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self._last_epoch:
            return self.CONTINUE
        rung = self._rung(trial, result)
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP and rung and self._metric in result:
            milestone, cutoff = rung
            STOP_REASONS[trial.trial_id] = (
                f"{self._metric} {result[self._metric]:.4f} below the cutoff {cutoff:.4f} of the other trials "
                f"after epoch {int(milestone)} (ASHA keeps the best 1/{self._reduction_factor:g})"
            )
        return action

    def _rung(self, trial, result: dict) -> tuple[float, float] | None:
        """(milestone, cutoff in the metric's own sign) of the rung this result is judged at, if any."""
        bracket = self._trial_info.get(trial.trial_id)
        t = result.get(self._time_attr, 0)
        for milestone, recorded in bracket._rungs if bracket else ():  # ASHA's own rungs, highest first
            if t < milestone or trial.trial_id in recorded:
                continue
            cutoff = bracket.cutoff(recorded)
            return (milestone, self._metric_op * cutoff) if cutoff is not None else None
        return None


def orphaned_placement_groups() -> list[str]:
    """Ids of live, non-detached placement groups whose creating actor is dead (a stopped trial's)."""
    from ray.core.generated import gcs_pb2

    accessor = ray._private.state.state._connect_and_get_accessor()
    found = []
    for raw in accessor.get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        creator = bytes(pg.creator_actor_id)
        if pg.is_detached or pg.state == gcs_pb2.PlacementGroupTableData.REMOVED:
            continue
        if creator and creator.strip(NIL_ACTOR) and pg.creator_actor_dead:
            found.append(pg.placement_group_id.hex())
    return found


def release_orphaned_placement_groups() -> int:
    """Remove what GCS would remove only at job end; returns how many were released."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    released = 0
    for pg_id in orphaned_placement_groups():
        try:
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
            released += 1
        except Exception:  # removed meanwhile (by Ray Train's own cleaner): nothing left to do
            pass
    return released


class ReleaseStoppedTrials(Callback):
    """After each trial ends, and every `every_s` while the search runs, free orphaned reservations."""

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self._last = 0.0
        self.released = 0

    def _sweep(self) -> None:
        self._last = time.monotonic()
        self.released += release_orphaned_placement_groups()

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.monotonic() - self._last >= self.every_s:  # the controller may die after the trial ends
            self._sweep()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._sweep()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._sweep()


def placeable_trials(per_trial: dict[str, float]) -> int:
    """How many trials the cluster can hold at once, each needing `per_trial` ({"CPU": 1.01, "GPU": 1})."""
    have = ray.cluster_resources()
    fits = [math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in per_trial.items() if v > 0]
    return min(fits) if fits else 1
