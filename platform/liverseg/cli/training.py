"""`liverseg train | tune`: a Ray Train run, a Ray Tune search."""

from __future__ import annotations

from pathlib import Path

import typer

from liverseg.cli.app import ConfigOpt, ProfileOpt, SetOpt, VerboseOpt, app, fail, keys_help, load_stage, quietly


@app.command(epilog=keys_help("TrainConfig"))
def train(
    store: str = typer.Option(..., help="slice store path or URL"),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    profile: str | None = ProfileOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Train a U-Net on Ray Train from the slice store; tracked in MLflow (prints the run id)."""
    from liverseg.core.config import TrainConfig
    from liverseg.core.console import EpochView
    from liverseg.training.train import train as run_train

    cfg = load_stage(TrainConfig, config, set_, profile, "train")
    res = quietly("train", verbose, lambda con: run_train(store, cfg, view=EpochView(con, cfg.train.epochs)))
    state = "already finished" if res.resumed_finished else "finished"
    typer.echo(
        f"run {res.run_name} {state}: mlflow run {res.run_id}, best val_dice {res.best_val_dice:.4f} "
        f"(epoch {res.best_epoch}), model {res.model_uri}"
    )


@app.command(epilog=keys_help("TuneConfig"))
def tune(
    store: str = typer.Option(..., help="slice store path or URL"),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    profile: str | None = ProfileOpt,
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted search of the same tune.name"),
    out: Path = typer.Option(Path("tune-results.json"), help="results JSON (a DVC output)"),
    plots_dir: Path | None = typer.Option(None, help="write search.json and curves.json here (dvc plots)"),
    verbose: bool = VerboseOpt,
) -> None:
    """Search learning rate and loss weights with Ray Tune (ASHA); each trial an MLflow child run."""
    from liverseg.core.config import TuneConfig
    from liverseg.core.console import EpochView
    from liverseg.training.tune import tune_search
    from liverseg.training.tune_report import format_table

    cfg = load_stage(TuneConfig, config, set_, profile, "tune")
    log: list[str] = []

    def go(con):
        log.append(con.log_hint())
        view = EpochView(con, cfg.tune.num_samples * cfg.train.epochs)
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
    best = summary.best
    if not best.model_uri:
        fail(f"no trial finished with a model; first failure: {best.error or 'none'}{log[0]}", 1)
    typer.echo(
        f"best trial {best.trial_id}: val_dice {best.val_dice:.4f}, mlflow run {best.run_id}, "
        f"checkpoint {best.checkpoint}; results -> {out}; search run {summary.parent_run_id} "
        f"(liverseg register --best-of-tune-run {summary.parent_run_id})"
    )
