"""`liverseg evaluate | score | register | lineage` (promotion and accounts: `governance`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from liverseg.cli.app import VerboseOpt, app, fail, quietly
from liverseg.tracking.tags import CHALLENGER, SERVED_MODEL


def _model_from(model: str | None, model_from: Path | None) -> str:
    from liverseg.tracking.results import read_results

    if (model is None) == (model_from is None):
        fail("give exactly one of --model URI or --model-from tune-results.json")
    if model_from is not None:
        best = read_results(model_from).best
        if not best.model_uri:
            fail(f"{model_from}: best trial logged no model")
        return best.model_uri
    return model


@app.command()
def evaluate(
    store: str = typer.Option(..., help="slice store path or URL"),
    model: str | None = typer.Option(None, help="MLflow model URI: runs:/..., models:/name/3, models:/name@champion"),
    model_from: Path | None = typer.Option(None, help="take the best trial's model from tune-results.json"),
    raw: Path | None = typer.Option(None, help="LiTS NIfTI folder: score on each volume's original grid"),
    split: str = typer.Option("test", help="train | val | test"),
    lcc: bool = typer.Option(True, "--lcc/--no-lcc", help="3-D largest-connected-component clean-up"),
    out: Path = typer.Option(Path("metrics/test-metrics.json"), help="summary JSON (DVC metrics)"),
    cases_csv: Path = typer.Option(Path("metrics/test-cases.csv"), help="per-case table"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    verbose: bool = VerboseOpt,
) -> None:
    """Score a model per volume (Dice, IoU, VOE, RVD, ASSD, MSD, HD95) and log an evaluation run."""
    from liverseg.registry.evaluate import evaluate as run_eval
    from liverseg.registry.evaluate import log_evaluation, write_outputs

    uri = _model_from(model, model_from)

    def go(con):
        import tempfile

        from liverseg.registry.evaluate import worst_overlays
        from liverseg.tracking.models import load_model

        lm = load_model(uri, device)
        ev = run_eval(uri, store, split, raw, lcc, device, lm=lm)
        write_outputs(ev, out, cases_csv)
        with tempfile.TemporaryDirectory() as tmp:
            images = worst_overlays(ev, lm, raw, tmp)
            return ev, log_evaluation(ev, out, cases_csv, images=images)

    ev, rid = quietly("evaluate", verbose, go)
    d = ev.summary["dice"]
    grid = "LiTS: original grid, per volume" if raw else "store grid, not LiTS"
    typer.echo(
        f"{split} ({grid}, {len(ev.cases)} cases): Dice mean {d['mean']:.4f} median {d['median']:.4f} "
        f"min {d['min']:.4f}; global Dice {ev.summary['global_dice']:.4f} -> {out} (mlflow run {rid})"
    )


@app.command()
def score(
    pred: Path = typer.Option(..., help="segmentation to score (.nii/.nii.gz)"),
    ref: Path = typer.Option(..., help="reference on the same grid"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Score any liver mask against a reference (liver = label >= 1 in both)."""
    from liverseg.registry.evaluate import score_files

    s = score_files(pred, ref)
    if as_json:
        typer.echo(json.dumps(s))
    else:
        typer.echo("  ".join(f"{k} {'undefined' if v is None else f'{v:.4f}'}" for k, v in s.items()))


@app.command()
def register(
    run: str | None = typer.Option(None, "--run", help="MLflow training run id"),
    best_of_tune: Path | None = typer.Option(None, help="tune-results.json: register its best trial"),
    best_of_tune_run: str | None = typer.Option(
        None, help="MLflow parent run id of a search: register its best trial (no local file needed)"
    ),
    name: str = typer.Option(SERVED_MODEL, help="registered model name"),
    out: Path | None = typer.Option(None, help="write {name, version, run_id, alias} JSON here (DVC output)"),
    test_metrics: Path | None = typer.Option(
        None, help="`liverseg evaluate` JSON of this model: tagged on the version"
    ),
    alias: str = typer.Option(CHALLENGER, help="alias to move onto the new version ('' for none)"),
    verbose: bool = VerboseOpt,
) -> None:
    """Register a trained model version with lineage tags, test scores and a description; alias it.

    Inside `dvc exp run` (DVC_EXP_NAME set) no alias moves unless LIVERSEG_ALIAS_IN_EXPERIMENTS=1:
    an experiment registers its model for comparison, it does not nominate it.
    """
    import os

    from liverseg.core import env
    from liverseg.registry.register import register as run_register

    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment and not env.alias_in_experiments():
        alias = ""
    mv = quietly(
        "register",
        verbose,
        lambda con: run_register(run, best_of_tune, name, best_of_tune_run, test_metrics, alias or None),
    )
    if out:
        from liverseg.core.files import atomic_write_json

        atomic_write_json(
            out, {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "alias": alias or None}
        )
    where = (
        f"as @{alias}"
        if alias
        else f"without an alias (experiment {experiment}; {env.ALIAS_IN_EXPERIMENTS}=1 to alias)"
    )
    typer.echo(f"registered {mv.name} v{mv.version} (run {mv.run_id}) {where}")


@app.command()
def lineage(uri: str = typer.Argument(..., help="models:/NAME@ALIAS or models:/NAME/VERSION")) -> None:
    """Print model version -> training run -> git commit -> DVC data hash -> store cases and split."""
    from liverseg.registry.lineage import lineage as run_lineage

    typer.echo("\n".join(run_lineage(uri)))
