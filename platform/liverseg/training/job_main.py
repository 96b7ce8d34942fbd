"""The driver of a submitted liverseg job, started by Ray's job supervisor on the cluster:
`python -m liverseg.training.job_main`, its spec in the job's metadata (see submit).

It opens the sealed credentials, sends everything it and its children write through the redacting filter
(the job's log is Ray's, readable by every cluster user), works in a folder of its own (nothing lands in
anyone's checkout), runs the search or the training as the local commands do, and leaves the results in
MLflow (`tune-results.json` on the search's parent run). Progress lines carry a mark so that `liverseg
jobs logs` shows them alone. Ray's `job stop` (SIGTERM) ends it as Ctrl-C does: runs KILLED, slots freed.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

from liverseg.core.console import Console, EpochView, root_cause
from liverseg.core.errors import LiversegError
from liverseg.tracking import tags
from liverseg.tracking.runs import client as mlflow_client
from liverseg.tracking.runs import ui_url
from liverseg.training.credentials import open_job_env, redact, redacted_output
from liverseg.training.runtime import JOB_CONFIG_ENV, stop_on_sigterm
from liverseg.training.submit import JobSpec, close_run

MARK = "liverseg> "  # the progress lines of a job's log (`liverseg jobs logs` shows only these)


class _Marked(io.TextIOBase):
    """A text stream that prefixes each line with MARK (one write per line: Console writes whole lines)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        lines = text.splitlines(keepends=True)
        self.stream.write("".join(MARK + line for line in lines))
        self.stream.flush()
        return len(text)


def _tune(spec: JobSpec, con: Console, work: Path) -> None:
    from liverseg.core.config import TuneConfig
    from liverseg.training.tune import tune_search
    from liverseg.training.tune_report import best_line, format_table

    cfg = TuneConfig.model_validate(spec.config)
    view = EpochView(con, spec.trials * cfg.train.epochs, upper=cfg.tune.scheduler == "asha")
    results = work / "tune-results.json"
    summary = tune_search(
        spec.store,
        cfg,
        resume=spec.resume,
        results_path=results,
        view=view,
        parent_run_id=spec.run_id,
        lineage=spec.lineage,
        job=spec.job_id,
    )
    mlflow_client().log_artifact(spec.run_id, str(results))
    for line in format_table(summary).splitlines():
        con.line(line)
    for t in summary.trials:
        if t.error:
            con.line(f"trial {t.trial_id} failed: {t.error}")
    con.line(best_line(summary, f"artifact tune-results.json of run {spec.run_id}"))


def _train(spec: JobSpec, con: Console) -> None:
    from liverseg.core.config import TrainConfig
    from liverseg.training.admission import wait_for_slot
    from liverseg.training.runtime import ensure_ray, workers_need
    from liverseg.training.train import train

    cfg = TrainConfig.model_validate(spec.config)
    client = mlflow_client()
    ensure_ray(None)

    def waiting(why: str) -> None:
        con.line(f"waiting for a slot: {why}")
        client.set_tag(spec.run_id, tags.JOB_STATE, f"waiting: {why}")

    slot = wait_for_slot(
        f"{spec.job_id}/train", spec.owner, spec.job_id, workers_need(cfg), cfg.team.max_trials_per_user, waiting
    )
    client.set_tag(spec.run_id, tags.JOB_STATE, "running")
    try:
        res = train(spec.store, cfg, lineage=spec.lineage, view=EpochView(con, cfg.train.epochs))
    finally:
        slot.release()
    state = "already finished" if res.resumed_finished else "finished"
    con.line(
        f"run {res.run_name} {state}: mlflow run {res.run_id}, best val_dice {res.best_val_dice:.4f} "
        f"(epoch {res.best_epoch + 1}/{cfg.train.epochs}), model {res.model_uri}"
    )


def _run(spec: JobSpec, con: Console) -> int:
    """The job itself; its exit status (0, 1 failed, 130 stopped)."""
    import ray
    import torch

    work = Path(tempfile.mkdtemp(prefix=f"liverseg-{spec.job_id}-"))
    os.chdir(work)  # nothing written relative to the cwd lands in a checkout
    client = mlflow_client()
    link = ui_url(spec.run_id, spec.experiment_id) or f"run {spec.run_id} (mlflow ui)"
    con.line(f"job {spec.job_id} of {spec.owner}: {spec.kind}; MLflow {link}")  # the search's: its parent run
    client.set_tag(spec.run_id, tags.RAY_VERSION, ray.__version__)  # the cluster's, not the submitter's
    client.set_tag(spec.run_id, tags.TORCH_VERSION, torch.__version__)
    try:
        _tune(spec, con, work) if spec.kind == "tune" else _train(spec, con)
        return 0
    except KeyboardInterrupt:
        close_run(spec.run_id, "KILLED")
        con.line(f"stopped: job {spec.job_id}, its MLflow runs KILLED")
        return 130
    except LiversegError as e:
        close_run(spec.run_id, "FAILED")
        con.line(f"error: {redact(str(e))}")
    except Exception as e:
        traceback.print_exc()  # into the job's log, through the redacting filter
        close_run(spec.run_id, "FAILED")
        con.line(f"error: {redact(root_cause(e))}")
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return 1


def main() -> int:
    stop_on_sigterm()  # a stop during start-up counts too
    metadata = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}").get("metadata")
    spec = JobSpec.from_metadata(metadata)
    if spec is None:
        print("error: not a liverseg job (no spec in the job's metadata)", file=sys.stderr)
        return 2
    open_job_env()
    with redacted_output():
        return _run(spec, Console(_Marked(sys.stdout)))


if __name__ == "__main__":
    sys.exit(main())
