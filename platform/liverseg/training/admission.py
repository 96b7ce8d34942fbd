"""Who may start a trial on a shared cluster now: a per-person cap and a wait for free resources.

Ray has no quotas: one search may take every CPU, and a trial whose Ray Train workers find none times
out and fails. So on a cluster each trial (and each training job) asks for a slot before it starts its
workers, and waits, visibly, while its owner already runs `team.max_trials_per_user` of them or while the
cluster lacks the CPUs and GPUs its workers need. One detached actor per cluster keeps the slots
(`Slots`, the plain bookkeeping, testable without Ray): first come, first served, a later trial that fits
may pass one that does not; a slot is held by heartbeats and freed on release, or a minute after its
holder stopped beating (a stopped trial, a lost driver). A fairness rule among colleagues, not a security
boundary: whoever can submit Ray jobs can run any code on the cluster.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

ACTOR_NAME, NAMESPACE = "liverseg-slots-v1", "liverseg"
HEARTBEAT_S, TTL_S, SETTLE_S, POLL_S = 10.0, 60.0, 20.0, 2.0


@dataclass
class Lease:
    """One trial's (or training job's) request, then its slot."""

    key: str  # <job id>/<trial id>
    user: str
    job: str
    need: dict[str, float]  # {"CPU": 1.0, "GPU": 1.0}: what its Ray Train workers will take
    cap: int  # its owner's team.max_trials_per_user
    since: float  # first asked: the queue order
    seen: float  # last heartbeat
    granted: float | None = None
    why: str = ""  # why it waits


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v > 0)


@dataclass
class Slots:
    """The bookkeeping behind the actor: leases by key; `available` is Ray's view of free resources."""

    leases: dict[str, Lease] = field(default_factory=dict)

    def _expire(self, now: float) -> None:
        for key in [k for k, lease in self.leases.items() if now - lease.seen > TTL_S]:
            del self.leases[key]

    def _running(self, user: str) -> int:
        return sum(1 for lease in self.leases.values() if lease.user == user and lease.granted is not None)

    def ask(self, key: str, user: str, job: str, need: dict, cap: int, available: dict, now: float) -> bool:
        """Register or refresh `key`'s request; True once it holds a slot."""
        self._expire(now)
        lease = self.leases.setdefault(key, Lease(key, user, job, dict(need), cap, now, now))
        lease.seen = now
        if lease.granted is not None:
            return True
        settling = [x for x in self.leases.values() if x.granted is not None and now - x.granted < SETTLE_S]
        free = dict(available)
        for x in settling:  # granted a moment ago: Ray may not count their workers yet
            for k, v in x.need.items():
                free[k] = free.get(k, 0.0) - v
        running: dict[str, int] = {}
        for x in sorted(self.leases.values(), key=lambda x: x.since):  # the queue, oldest first
            if x.granted is not None:
                continue
            done = running.setdefault(x.user, self._running(x.user))
            if done >= x.cap:
                x.why = f"{x.user} runs {done} of {x.cap} trials at once (team.max_trials_per_user)"
            elif not _fits(x.need, free):
                have = ", ".join(f"{k} {max(free.get(k, 0.0), 0):.2f}" for k in x.need)
                x.why = f"cluster full: its workers need {_show(x.need)}, free {have}"
            else:
                for k, v in x.need.items():  # earlier ones take their share first
                    free[k] = free.get(k, 0.0) - v
                running[x.user] = done + 1
                if x is lease:
                    lease.granted, lease.why = now, ""
                    return True
        return False

    def renew(self, key: str, now: float) -> None:
        if key in self.leases:
            self.leases[key].seen = now

    def release(self, key: str) -> None:
        self.leases.pop(key, None)

    def release_job(self, job: str) -> None:
        for key in [k for k, lease in self.leases.items() if lease.job == job]:
            del self.leases[key]

    def summary(self, job: str, now: float) -> dict:
        """{"running": n, "waiting": m, "why": the first waiting lease's reason}."""
        self._expire(now)
        mine = sorted((x for x in self.leases.values() if x.job == job), key=lambda x: x.since)
        waiting = [x for x in mine if x.granted is None]
        return {"running": len(mine) - len(waiting), "waiting": len(waiting), "why": waiting[0].why if waiting else ""}


def _show(need: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in need.items() if v > 0)


class SlotsActor:
    """The Ray actor around `Slots` (one per cluster, on the head, no CPU of its own)."""

    def __init__(self) -> None:
        self.slots = Slots()

    def ask(self, key: str, user: str, job: str, need: dict, cap: int) -> tuple[bool, str]:
        import ray

        granted = self.slots.ask(key, user, job, need, cap, ray.available_resources(), time.time())
        return granted, self.slots.leases[key].why

    def renew(self, key: str) -> None:
        self.slots.renew(key, time.time())

    def release(self, key: str) -> None:
        self.slots.release(key)

    def release_job(self, job: str) -> None:
        self.slots.release_job(job)

    def summary(self, job: str) -> dict:
        return self.slots.summary(job, time.time())


def slots_actor():
    """The cluster's slots actor, started by the first job that needs it. It opens nobody's credentials
    (the sealed variable is blanked for it) and lives on the head, which never scales away."""
    import ray

    from liverseg.core import env

    cls = ray.remote(num_cpus=0, max_restarts=-1)(SlotsActor)
    return cls.options(
        name=ACTOR_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        resources={"node:__internal_head__": 0.001},
        runtime_env={"env_vars": {env.JOB_SEALED_ENV: ""}},
    ).remote()


@dataclass
class Slot:
    """A held slot: a thread beats for it until `release()`."""

    actor: object
    key: str
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread(target=self._beat, name="liverseg-slot", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.actor.renew.remote(self.key)

    def release(self) -> None:
        self._stop.set()
        self.actor.release.remote(self.key)


def wait_for_slot(
    key: str, user: str, job: str, need: dict[str, float], cap: int, on_wait: Callable[[str], None] | None = None
) -> Slot:
    """Block until `key` holds a slot; `on_wait(why)` each time the reason for waiting changes."""
    import ray

    actor = slots_actor()
    last = ""
    while True:
        granted, why = ray.get(actor.ask.remote(key, user, job, need, cap))
        if granted:
            return Slot(actor, key)
        if why != last and on_wait:
            on_wait(why)
        last = why
        time.sleep(POLL_S)
