"""`liverseg jobs`: the team's submitted jobs, from Ray's Jobs API (status, times, owner in the job's
metadata) and MLflow (the job's run: trials done, best score so far, waiting or running); their logs;
stopping one (its owner or an admin, by the login the tracking server verifies); resuming one.

Ray's own `ray job stop` is not guarded by liverseg: anyone holding the cluster's token may stop any job.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from liverseg.core.errors import PermissionRefused, TrainError
from liverseg.tracking import tags
from liverseg.tracking.runs import Login, ui_url
from liverseg.tracking.runs import client as mlflow_client
from liverseg.training.credentials import redact
from liverseg.training.submit import JobSpec, Submitted, check_place_free, close_run, jobs_client, send

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ENDED_AS = {"FAILED": "FAILED", "STOPPED": "KILLED"}  # a job Ray saw end: its open MLflow runs end so


@dataclass
class JobRow:
    """One job as `liverseg jobs` shows it (and `--json` prints it)."""

    id: str
    owner: str
    kind: str
    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    experiment: str
    submitted_at: str  # UTC, ISO 8601
    duration_s: float
    trials_done: int | None
    trials: int
    trials_running: int  # now, on the cluster (a search's)
    trials_waiting: int  # now, for a slot (see admission)
    best_val_dice: float | None
    mlflow_run_id: str
    mlflow_url: str | None
    waiting_for: str = ""  # why it (or some of its trials) waits
    resumable: bool = False  # ended before its search finished: `liverseg jobs resume ID`
    message: str = ""  # Ray's word on a failed job, first line


def _utc(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds") if ms else ""


def _runs(specs: list[JobSpec]) -> dict[str, object]:
    """The jobs' MLflow runs by id: one search over their experiments (per experiment, skipping those the
    caller may not read, if the server refuses the one search)."""
    client = mlflow_client()
    ids = sorted({s.run_id for s in specs})
    found = {}

    def search(exps: list[str]) -> None:
        for i in range(0, len(ids), 100):
            quoted = ", ".join(f"'{r}'" for r in ids[i : i + 100])
            for run in client.search_runs(exps, filter_string=f"attributes.run_id IN ({quoted})", max_results=100):
                found[run.info.run_id] = run

    exps = sorted({s.experiment_id for s in specs})
    try:
        search(exps)
    except Exception:  # e.g. 403 on one experiment: the others still show
        for exp in exps:
            try:
                search([exp])
            except Exception:
                continue
    return found


def _row(job, spec: JobSpec, run, now_ms: int) -> JobRow:
    metrics = run.data.metrics if run else {}
    state = run.data.tags.get(tags.JOB_STATE, "") if run else ""
    status = str(job.status)
    live = status == "RUNNING"
    waiting = state.split("waiting: ", 1)[1] if live and "waiting: " in state else ""
    end = job.end_time or now_ms
    best = metrics.get(tags.BEST_VAL_DICE)
    done = metrics.get(tags.TRIALS_DONE)
    return JobRow(
        id=job.submission_id,
        owner=spec.owner,
        kind=spec.kind,
        status="PENDING" if (live and state.startswith("waiting")) or status == "PENDING" else status,
        experiment=spec.config.get("run", {}).get("experiment", ""),
        submitted_at=_utc(job.start_time),
        duration_s=round(max(end - (job.start_time or end), 0) / 1000, 1),
        trials_done=int(done) if done is not None else None,
        trials=spec.trials,
        trials_running=int(metrics.get(tags.TRIALS_RUNNING, 0)) if live else 0,
        trials_waiting=int(metrics.get(tags.TRIALS_WAITING, 0)) if live else 0,
        best_val_dice=None if best is None or math.isnan(best) else round(best, 6),
        mlflow_run_id=spec.run_id,
        mlflow_url=ui_url(spec.run_id, spec.experiment_id),
        waiting_for=waiting,
        resumable=status in ("FAILED", "STOPPED") and bool(run) and run.info.status != "FINISHED",
        message=_last_words(job.message) if status == "FAILED" else "",
    )


def _last_words(message: str | None) -> str:
    """The last line of Ray's message on a failed job (it quotes the log's end: the driver's error line)."""
    from liverseg.training.job_main import MARK

    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    return redact(lines[-1].removeprefix(MARK.strip()).strip())[:300] if lines else ""


def list_jobs(address: str | None, me: Login, everyone: bool = False) -> list[JobRow]:
    """The caller's liverseg jobs (`everyone`: all of them), newest first. The caller's jobs that Ray saw
    end while their MLflow run stayed open (a lost driver) get that run closed: FAILED, or KILLED."""
    jobs = []
    for job in jobs_client(address).list_jobs():
        spec = JobSpec.from_metadata(job.metadata)
        if spec and (everyone or spec.owner == me.name):
            jobs.append((job, spec))
    runs = _runs([s for _, s in jobs]) if jobs else {}
    for job, spec in jobs:
        run = runs.get(spec.run_id)
        if (
            spec.owner == me.name
            and str(job.status) in ENDED_AS
            and run
            and run.info.status in ("RUNNING", "SCHEDULED")
        ):
            close_run(spec.run_id, ENDED_AS[str(job.status)])
            runs[spec.run_id] = mlflow_client().get_run(spec.run_id)
    now = int(time.time() * 1000)
    rows = [_row(job, spec, runs.get(spec.run_id), now) for job, spec in jobs]
    return sorted(rows, key=lambda r: r.submitted_at, reverse=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def format_jobs(rows: list[JobRow]) -> str:
    head = ["job", "owner", "kind", "experiment", "status", "submitted (UTC)", "took", "trials", "best", "mlflow run"]
    table = [
        [
            r.id,
            r.owner,
            r.kind,
            r.experiment,
            r.status,
            r.submitted_at[:19].replace("T", " "),
            _clock(r.duration_s),
            f"{r.trials_done or 0}/{r.trials}" if r.kind == "tune" else "-",
            f"{r.best_val_dice:.4f}" if r.best_val_dice is not None else "-",
            r.mlflow_url or r.mlflow_run_id,
        ]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *table]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [head, *table]]
    for r in rows:
        if r.waiting_for:
            lines.append(f"{r.id} waits: {r.waiting_for}")
        if r.resumable:
            lines.append(f"{r.id} ended before its {r.kind} finished: liverseg jobs resume {r.id}")
        if r.message:
            lines.append(f"{r.id} failed: {r.message}")
    return "\n".join(lines) if rows else "no jobs"


def as_json(rows: list[JobRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def _job(client, job_id: str) -> tuple[object, JobSpec]:
    try:
        job = client.get_job_info(job_id)
    except Exception:
        raise TrainError(f"job {job_id}: no such job on this cluster (liverseg jobs --all lists them)") from None
    spec = JobSpec.from_metadata(job.metadata)
    if spec is None:
        raise TrainError(f"job {job_id} was not submitted by liverseg: Ray's own `ray job stop` handles it")
    return job, spec


def check_owner(me: Login, spec: JobSpec, action: str) -> None:
    """Only the login that submitted the job (or an admin, for a stop) may act on it; a login the tracking
    server did not verify may not act on a job whose owner it did."""
    admin = me.is_admin and me.verified and action == "stop"
    if admin or (me.name == spec.owner and (me.verified or not spec.owner_verified)):
        return
    who = me.name if me.verified or not spec.owner_verified else f"{me.name} (a login no tracking server checked)"
    raise PermissionRefused(f"refused: {who} may not {action} job {spec.job_id}: it belongs to {spec.owner}")


def stop_job(address: str | None, job_id: str, me: Login, wait_s: float = 90.0) -> str:
    """Stop the job (SIGTERM to its driver) after the owner check; wait until Ray says it stopped."""
    client = jobs_client(address)
    job, spec = _job(client, job_id)
    check_owner(me, spec, "stop")
    if str(job.status) in TERMINAL:
        return f"job {job_id} already {job.status}"
    client.stop_job(job_id)
    deadline = time.monotonic() + wait_s
    while str(client.get_job_status(job_id)) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1.0)
    status = str(client.get_job_status(job_id))
    if status in ENDED_AS:  # stopped before its driver ran, or its driver could not close it
        close_run(spec.run_id, ENDED_AS[status])
    run = mlflow_client().get_run(spec.run_id)
    return f"job {job_id} {status}; its MLflow run {spec.run_id} {run.info.status}"


def resume_job(address: str | None, job_id: str, me: Login) -> Submitted:
    """Submit the job again, continuing where it ended (a search from its Tune state, a training from its
    last checkpoint), under a new job id; only its owner may (it runs with the caller's credentials)."""
    client = jobs_client(address)
    job, spec = _job(client, job_id)
    check_owner(me, spec, "resume")
    if str(job.status) not in ("FAILED", "STOPPED"):
        raise TrainError(f"job {job_id} is {job.status}: only a FAILED or STOPPED job resumes")
    check_place_free(client, spec.kind, spec.place)  # resumed twice, or its folder taken meanwhile
    new_id = f"{spec.kind}-{secrets.token_hex(4)}"
    mlflow = mlflow_client()
    for k, v in {tags.JOB_ID: new_id, tags.JOB_STATE: "submitted"}.items():
        mlflow.set_tag(spec.run_id, k, v)
    if mlflow.get_run(spec.run_id).info.status != "FINISHED":
        mlflow.update_run(spec.run_id, status="SCHEDULED")
    again = JobSpec(**{**asdict(spec), "job_id": new_id, "resume": True, "resumes": job_id})
    return send(client, again)


def job_logs(
    address: str | None, job_id: str | None, me: Login, follow: bool, verbose: bool, out: Callable[[str], None]
) -> tuple[str, str]:
    """Print a job's progress lines (`verbose`: its whole driver log), with `follow` until it ends;
    (job id, its status). No job id: the caller's newest job."""
    import asyncio

    from liverseg.training.job_main import MARK

    client = jobs_client(address)
    if job_id is None:
        mine = list_jobs(address, me)
        if not mine:
            raise TrainError(f"no jobs of {me.name} on this cluster")
        job_id = mine[0].id
    _job(client, job_id)

    def show(line: str) -> None:
        if verbose:
            out(redact(line))
        elif line.startswith(MARK):
            out(redact(line[len(MARK) :]))

    async def tail() -> None:
        pending = ""
        async for chunk in client.tail_job_logs(job_id):
            *lines, pending = (pending + chunk).split("\n")
            for line in lines:
                show(line)
        if pending:
            show(pending)

    if follow:
        asyncio.run(tail())
    else:
        for line in client.get_job_logs(job_id).splitlines():
            show(line)
    info = client.get_job_info(job_id)
    status = str(info.status)
    return job_id, f"{status}: {_last_words(info.message)}" if status == "FAILED" else status
