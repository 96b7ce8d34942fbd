"""`liverseg train | tune | jobs`: a Ray Train run, a Ray Tune search, here or submitted to a shared Ray
cluster as a Ray job; the team's submitted jobs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from liverseg.cli.app import ConfigOpt, ProfileOpt, SetOpt, VerboseOpt, app, fail, keys_help, load_stage, quietly

SubmitOpt = typer.Option(
    False, "--submit", help="run it as a Ray job on the cluster at RAY_ADDRESS (returns at once; see liverseg jobs)"
)


def _source(config: Path | None, profile: str | None, stage: str) -> str:
    if config is None and Path("pipelines", f"{stage}.yaml").exists():
        config = Path("pipelines", f"{stage}.yaml")
    return f"config {config or 'defaults'}, profile {profile or 'pipelines/profile.yaml'}"


def _submit(kind: str, store: str, cfg, set_: list[str] | None, source: str, resume: bool) -> None:
    from liverseg.training.submit import submit

    done = submit(kind, store, cfg, list(set_ or []), source, resume)
    spec = done.spec
    verified = "checked by the tracking server" if spec.owner_verified else "not checked: no tracking server login"
    typer.echo(f"submitted {kind} job {spec.job_id} as {spec.owner} ({verified})")
    what = (
        f"search {cfg.tune.name}: {spec.trials} trials x {cfg.train.epochs} epochs"
        if kind == "tune"
        else f"training run {cfg.run.name}: {cfg.train.epochs} epochs"
    )
    typer.echo(f"  {what}, experiment {cfg.run.experiment}, store {spec.store}")
    typer.echo(f"  MLflow: {done.url or f'run {spec.run_id} (mlflow ui)'}")
    typer.echo(f"  follow: liverseg jobs logs {spec.job_id} --follow")
    typer.echo(f"  stop:   liverseg jobs stop {spec.job_id}")


@app.command(epilog=keys_help("TrainConfig"))
def train(
    store: str = typer.Option(..., help="slice store path or URL"),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    profile: str | None = ProfileOpt,
    submit: bool = SubmitOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Train a U-Net on Ray Train from the slice store; tracked in MLflow (prints the run id)."""
    from liverseg.core.config import TrainConfig
    from liverseg.core.console import EpochView
    from liverseg.training.train import train as run_train

    cfg = load_stage(TrainConfig, config, set_, profile, "train")
    if submit:
        return _submit("train", store, cfg, set_, _source(config, profile, "train"), resume=False)
    res = quietly("train", verbose, lambda con: run_train(store, cfg, view=EpochView(con, cfg.train.epochs)))
    state = "already finished" if res.resumed_finished else "finished"
    typer.echo(
        f"run {res.run_name} {state}: mlflow run {res.run_id}, best val_dice {res.best_val_dice:.4f} "
        f"(epoch {res.best_epoch + 1}/{cfg.train.epochs}), model {res.model_uri}"
    )


@app.command(epilog=keys_help("TuneConfig"))
def tune(
    store: str = typer.Option(..., help="slice store path or URL"),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    profile: str | None = ProfileOpt,
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted search of the same tune.name"),
    out: Path | None = typer.Option(None, help="results JSON (a DVC output) [default: tune-results.json]"),
    plots_dir: Path | None = typer.Option(None, help="write search.json and curves.json here (dvc plots)"),
    submit: bool = SubmitOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Search learning rate and loss weights with Ray Tune (ASHA); each trial an MLflow child run."""
    from liverseg.core.config import TuneConfig
    from liverseg.core.console import EpochView
    from liverseg.training.search import trial_count
    from liverseg.training.tune import tune_search
    from liverseg.training.tune_report import best_line, format_table

    cfg = load_stage(TuneConfig, config, set_, profile, "tune")
    if submit:
        if out or plots_dir:
            fail("--out/--plots-dir: a submitted search leaves its results in MLflow (its parent run's artifact)")
        return _submit("tune", store, cfg, set_, _source(config, profile, "tune"), resume)
    out = out or Path("tune-results.json")
    log: list[str] = []

    def go(con):
        log.append(con.log_hint())
        trials = trial_count(cfg.tune.num_samples, cfg.space)
        view = EpochView(con, trials * cfg.train.epochs, upper=cfg.tune.scheduler == "asha")
        summary = tune_search(store, cfg, resume=resume, results_path=out, view=view)
        if plots_dir:
            from liverseg.tracking.runs import client
            from liverseg.training.tune_report import write_dvc_plots

            write_dvc_plots(client(), summary, plots_dir)
        return summary

    summary = quietly("tune", verbose, go)
    typer.echo(format_table(summary))
    for t in summary.trials:
        if t.error:
            typer.echo(f"trial {t.trial_id} failed: {t.error}", err=True)
    from liverseg.core.errors import TrainError

    try:
        typer.echo(best_line(summary, str(out)))
    except TrainError as e:
        fail(f"{e}{log[0]}", 1)


jobs_app = typer.Typer(
    help="The team's jobs on the Ray cluster at RAY_ADDRESS: list (yours; --all: everyone's), logs, stop, resume.",
    rich_markup_mode=None,
)
app.add_typer(jobs_app, name="jobs")


def _address() -> str | None:
    return os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")


@jobs_app.callback(invoke_without_command=True)
def jobs(
    ctx: typer.Context,
    everyone: bool = typer.Option(False, "--all", help="everyone's jobs, not only yours"),
    as_json: bool = typer.Option(False, "--json", help="a JSON list of objects, for scripts"),
) -> None:
    """Your submitted jobs: id, owner, kind, experiment, status, submitted, duration, trials, best val_dice, run."""
    if ctx.invoked_subcommand:
        return
    from liverseg.tracking.runs import login
    from liverseg.training.jobs import as_json as to_json
    from liverseg.training.jobs import format_jobs, list_jobs

    rows = list_jobs(_address(), login(), everyone)
    typer.echo(json.dumps(to_json(rows), indent=2) if as_json else format_jobs(rows))


@jobs_app.command("logs")
def jobs_logs(
    job_id: str | None = typer.Argument(None, help="the job [default: your newest]"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="the whole driver log (Ray's and MLflow's too)"),
) -> None:
    """The job's progress lines (one per trial event and epoch, as `liverseg tune` prints them)."""
    from liverseg.tracking.runs import login
    from liverseg.training.jobs import job_logs

    job_id, status = job_logs(_address(), job_id, login(), follow, verbose, typer.echo)
    typer.echo(f"job {job_id}: {status}")


@jobs_app.command("stop")
def jobs_stop(job_id: str = typer.Argument(..., help="the job")) -> None:
    """Stop a job (its owner or an admin): its trials end, its MLflow runs are KILLED, its CPUs freed."""
    from liverseg.tracking.runs import login
    from liverseg.training.jobs import stop_job

    typer.echo(stop_job(_address(), job_id, login()))


@jobs_app.command("resume")
def jobs_resume(job_id: str = typer.Argument(..., help="a FAILED or STOPPED job of yours")) -> None:
    """Submit the job again where it ended (a search from its Tune state, a training from its checkpoint)."""
    from liverseg.tracking.runs import login
    from liverseg.training.jobs import resume_job

    done = resume_job(_address(), job_id, login())
    typer.echo(f"resumed job {job_id} as {done.spec.job_id}: MLflow {done.url or done.spec.run_id}")
    typer.echo(f"  follow: liverseg jobs logs {done.spec.job_id} --follow")
