"""The `liverseg` command: one thin sub-command per stage over the plain functions tests call."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import typer

from liverseg.errors import ConfigError, LiversegError


class _App(typer.Typer):
    """The command group. Every error liverseg raises on purpose is a LiversegError with a one-line
    message: it is printed here, once for all commands (exit 2 for a config error, 1 otherwise), and so
    is an MLflow error about the user's request a command did not catch (a deleted version, ...);
    anything else is a bug and keeps its traceback."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except LiversegError as e:
            typer.echo(f"error: {e}", err=True)
            raise SystemExit(2 if isinstance(e, ConfigError) else 1) from None
        except Exception as e:
            if not type(e).__module__.startswith("mlflow."):
                raise
            typer.echo(f"error: MLflow: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
            raise SystemExit(1) from None


app = _App(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None)

ConfigOpt = typer.Option(None, "--config", "-c", help="stage YAML [default: pipelines/<stage>.yaml if present]")
SetOpt = typer.Option(None, "--set", "-s", help="override key=value (YAML value, dotted key); repeatable")
ProfileOpt = typer.Option(
    None, "--profile", help="profile in pipelines/profiles.yaml (demo, paper) [default: pipelines/profile.yaml's]"
)
VerboseOpt = typer.Option(False, "--verbose", "-v", help="print Ray's and MLflow's own output here, not to the log")
PIPELINES = Path("pipelines")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"liverseg {version('liverseg')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
) -> None:
    """Train, tune, track, register and serve liver-segmentation models (`liverseg COMMAND --help`)."""


def fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _quietly(command: str, verbose: bool, fn):
    """`fn(console)` with library output in the command's log file (see liverseg.console). A failure ends
    in one line: liverseg's own message, or for anything else the root cause (traceback in the log), then
    the log file's path."""
    import traceback

    from liverseg.console import quiet, root_cause

    with quiet(command, verbose) as con:
        try:
            return fn(con)
        except LiversegError as e:
            msg, code = str(e), 2 if isinstance(e, ConfigError) else 1
        except KeyboardInterrupt:  # train/tune marked their MLflow runs KILLED on the way out
            msg, code = f"interrupted: {command} stopped, its MLflow runs marked KILLED (rerun to resume)", 130
        except Exception as e:
            traceback.print_exc()  # into the log
            msg, code = root_cause(e), 1
        finally:  # Ray's last words (placement-group clean-up, worker exits) into the log, not after it
            ray = sys.modules.get("ray")
            if ray is not None and ray.is_initialized():
                ray.shutdown()
        msg += con.log_hint()
    fail(msg, code)


def keys_help(model_name: str) -> str:
    """`--help` epilog: every config key, its default and the reason for it."""
    from liverseg import config

    rows = [(k, json.dumps(d), why) for k, d, why in config.describe_keys(getattr(config, model_name))]
    width = min(max(len(k) + len(d) for k, d, _ in rows) + 5, 60)
    lines = [f"  {k} = {d}".ljust(width) + f"  {why}" for k, d, why in rows]
    return f"Config keys (--set KEY=VALUE; precedence: {config.PRECEDENCE}):\n\n\b\n" + "\n".join(lines)


def _load(model, config, overrides, profile, stage):
    """The stage's config; without --config/--profile, pipelines/<stage>.yaml and pipelines/profile.yaml."""
    from liverseg.config import default_profile, load_config

    if config is None and (PIPELINES / f"{stage}.yaml").exists():
        config = PIPELINES / f"{stage}.yaml"
    if profile is None:
        profile = default_profile(Path(config).parent if config else PIPELINES)
    cfg = load_config(model, config, overrides, profile=profile, stage=stage)
    typer.echo(f"{stage}: config {config or 'defaults'}, profile {profile or 'none'}", err=True)
    return cfg


@app.command()
def synth(
    out: Path = typer.Option(..., help="folder for volume-N.nii.gz / segmentation-N.nii.gz"),
    cases: int = typer.Option(10, min=1, help="number of phantoms"),
    seed: int = typer.Option(0, help="same seed, byte-identical files"),
    shape: tuple[int, int, int] = typer.Option((128, 128, 64), help="X Y Z voxels"),
) -> None:
    """Write synthetic LiTS-like CT phantoms."""
    from liverseg.phantoms import write_phantoms

    paths = write_phantoms(out, cases, seed, shape)
    typer.echo(f"wrote {len(paths)} phantom cases to {out}")


@app.command(epilog=keys_help("IngestConfig"))
def ingest(
    raw: Path = typer.Option(..., help="LiTS folder: volume-N.nii[.gz] + segmentation-N.nii[.gz]"),
    store: str = typer.Option(..., help="local Zarr v3 slice store to create or update (--verify: also s3://...)"),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    profile: str | None = ProfileOpt,
    verify: bool = typer.Option(False, "--verify", help="only check the store: listing, shapes, dtypes, hashes"),
    prune: bool = typer.Option(False, "--prune", help="remove stored cases whose files left the raw folder"),
    out: Path | None = typer.Option(None, help="write case, slice and split counts as JSON (DVC metrics)"),
    verbose: bool = VerboseOpt,
) -> None:
    """Convert LiTS NIfTI volumes into the sharded Zarr slice store (incremental, atomic per case)."""
    from liverseg.config import IngestConfig
    from liverseg.ingest import check_metrics_out
    from liverseg.ingest import ingest as run_ingest
    from liverseg.ingest import verify as run_verify

    if verify:
        problems = run_verify(str(store))
        for case, msg in problems.items():
            typer.echo(f"case {case}: {msg}", err=True)
        typer.echo(f"verify: {len(problems)} case(s) with problems")
        raise typer.Exit(1 if problems else 0)
    cfg = _load(IngestConfig, config, set_, profile, "ingest")

    def go(con):
        if out:
            check_metrics_out(out, raw, store)  # before the store is touched
        with contextlib.redirect_stderr(con.stream):  # the progress bar on the terminal
            report = run_ingest(raw, store, cfg, prune=prune)
        if out:
            _ingest_metrics(store, out)
        return report

    report = _quietly("ingest", verbose, go)
    for msg in report.failed.values():
        typer.echo(f"FAILED {msg}", err=True)
    if report.kept:
        typer.echo(f"kept {', '.join(report.kept)}: no files in {raw} (--prune removes them)", err=True)
    if report.pruned:
        typer.echo(f"pruned {', '.join(report.pruned)}: no files in {raw}")
    sizes = {k: len(v) for k, v in report.splits.items()}
    typer.echo(
        f"ingest: {len(report.written)} written, {len(report.skipped)} unchanged, "
        f"{len(report.failed)} failed; splits {sizes} -> {store}"
    )
    raise typer.Exit(0 if report.ok else 1)


def _ingest_metrics(store: str, out: Path) -> None:
    """Counts a user compares between experiments (`dvc exp show`): cases per split, slices, slice size."""
    from liverseg.storage import atomic_write_json
    from liverseg.store import SliceStore

    st = SliceStore(store)
    h, w = st.size
    counts = {f"{split}_cases": len(cases) for split, cases in st.splits.items()}
    slices = sum(st.num_slices(c) for c in st.cases)
    atomic_write_json(out, {"cases": len(st.cases), **counts, "slices": slices, "height": h, "width": w})


@app.command()
def publish(
    store: Path = typer.Option(..., help="local slice store written by `liverseg ingest`"),
    to: str = typer.Option(..., help="object-store URL, e.g. s3://bucket/stores/lits.zarr (AWS_* variables)"),
) -> None:
    """Upload a slice store to object storage for Ray workers on any node (incremental, root metadata last)."""
    from liverseg.publish import publish_store

    try:
        rep = publish_store(store, to)
    except OSError as e:
        fail(str(e), 1)
    extra = f"; {len(rep.extra)} object(s) there not in {store} (kept)" if rep.extra else ""
    typer.echo(f"publish: {len(rep.uploaded)} uploaded, {len(rep.unchanged)} unchanged -> {to}{extra}")


@app.command(epilog=keys_help("TrainConfig"))
def train(
    store: str = typer.Option(..., help="slice store path or URL"),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    profile: str | None = ProfileOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Train a U-Net on Ray Train from the slice store; tracked in MLflow (prints the run id)."""
    from liverseg.config import TrainConfig
    from liverseg.console import EpochView
    from liverseg.train import train as run_train

    cfg = _load(TrainConfig, config, set_, profile, "train")
    res = _quietly("train", verbose, lambda con: run_train(store, cfg, view=EpochView(con, cfg.train.epochs)))
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
    from liverseg.config import TuneConfig
    from liverseg.console import EpochView
    from liverseg.tune import format_table, tune_search

    cfg = _load(TuneConfig, config, set_, profile, "tune")
    log: list[str] = []

    def go(con):
        log.append(con.log_hint())
        view = EpochView(con, cfg.tune.num_samples * cfg.train.epochs)
        summary = tune_search(store, cfg, resume=resume, results_path=out, view=view)
        if plots_dir:
            from liverseg.report import write_dvc_plots
            from liverseg.tracking import client

            write_dvc_plots(client(), summary, plots_dir)
        return summary

    summary = _quietly("tune", verbose, go)
    typer.echo(format_table(summary))
    for t in summary.trials:
        if t.get("error"):
            typer.echo(f"trial {t['trial_id']} failed: {t['error']}", err=True)
    best = summary.best
    if not best["model_uri"]:
        fail(f"no trial finished with a model; first failure: {best.get('error') or 'none'}{log[0]}", 1)
    typer.echo(
        f"best trial {best['trial_id']}: val_dice {best['val_dice']:.4f}, mlflow run {best['run_id']}, "
        f"checkpoint {best['checkpoint']}; results -> {out}; search run {summary.parent_run_id} "
        f"(liverseg register --best-of-tune-run {summary.parent_run_id})"
    )


def _model_from(model: str | None, model_from: Path | None) -> str:
    if (model is None) == (model_from is None):
        fail("give exactly one of --model URI or --model-from tune-results.json")
    if model_from is not None:
        best = json.loads(model_from.read_text())["best"]
        if not best.get("model_uri"):
            fail(f"{model_from}: best trial logged no model")
        return best["model_uri"]
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
    from liverseg.evaluate import evaluate as run_eval
    from liverseg.evaluate import log_evaluation, write_outputs

    uri = _model_from(model, model_from)

    def go(con):
        import tempfile

        from liverseg.artifact import load_model
        from liverseg.evaluate import worst_overlays

        lm = load_model(uri, device)
        ev = run_eval(uri, store, split, raw, lcc, device, lm=lm)
        write_outputs(ev, out, cases_csv)
        with tempfile.TemporaryDirectory() as tmp:
            images = worst_overlays(ev, lm, raw, tmp)
            return ev, log_evaluation(ev, out, cases_csv, images=images)

    ev, rid = _quietly("evaluate", verbose, go)
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
    from liverseg.evaluate import score_files

    s = score_files(pred, ref)
    if as_json:
        typer.echo(json.dumps(s))
    else:
        typer.echo("  ".join(f"{k} {'undefined' if v is None else f'{v:.4f}'}" for k, v in s.items()))


EXP_ALIAS_ENV = "LIVERSEG_ALIAS_IN_EXPERIMENTS"  # `dvc exp run` moves no alias unless this is 1


@app.command()
def register(
    run: str | None = typer.Option(None, "--run", help="MLflow training run id"),
    best_of_tune: Path | None = typer.Option(None, help="tune-results.json: register its best trial"),
    best_of_tune_run: str | None = typer.Option(
        None, help="MLflow parent run id of a search: register its best trial (no local file needed)"
    ),
    name: str = typer.Option("liver-unet", help="registered model name"),
    out: Path | None = typer.Option(None, help="write {name, version, run_id, alias} JSON here (DVC output)"),
    test_metrics: Path | None = typer.Option(
        None, help="`liverseg evaluate` JSON of this model: tagged on the version"
    ),
    alias: str = typer.Option("challenger", help="alias to move onto the new version ('' for none)"),
    verbose: bool = VerboseOpt,
) -> None:
    """Register a trained model version with lineage tags, test scores and a description; alias it.

    Inside `dvc exp run` (DVC_EXP_NAME set) no alias moves unless LIVERSEG_ALIAS_IN_EXPERIMENTS=1:
    an experiment registers its model for comparison, it does not nominate it.
    """
    import os

    from liverseg.registry import register as run_register

    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment and os.environ.get(EXP_ALIAS_ENV) != "1":
        alias = ""
    mv = _quietly(
        "register",
        verbose,
        lambda con: run_register(run, best_of_tune, name, best_of_tune_run, test_metrics, alias or None),
    )
    if out:
        from liverseg.storage import atomic_write_json

        atomic_write_json(
            out, {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "alias": alias or None}
        )
    where = f"as @{alias}" if alias else f"without an alias (experiment {experiment}; {EXP_ALIAS_ENV}=1 to alias)"
    typer.echo(f"registered {mv.name} v{mv.version} (run {mv.run_id}) {where}")


ReasonOpt = typer.Option("", "--reason", help="why: recorded in the champion history (`liverseg history`)")


@app.command()
def promote(
    store: str = typer.Option(..., help="slice store with the test split"),
    name: str = typer.Option("liver-unet", help="served registered model (candidates: NAME-candidates)"),
    min_dice: float = typer.Option(0.9, help="floor on the challenger's mean test Dice"),
    margin: float = typer.Option(0.0, help="the challenger must beat the champion by more than this"),
    raw: Path | None = typer.Option(None, help="LiTS NIfTI folder: score on the original grid (the LiTS test Dice)"),
    reason: str = ReasonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Copy NAME-candidates@challenger into NAME as @champion only if it passes the floor and beats the champion."""
    from liverseg.registry import promote as run_promote

    d = _quietly("promote", verbose, lambda con: run_promote(store, name, min_dice, margin, reason=reason, raw=raw))
    typer.echo(d.line())


@app.command()
def rollback(name: str = typer.Option("liver-unet", help="registered model name"), reason: str = ReasonOpt) -> None:
    """Put @champion back on the champion it replaced."""
    from liverseg.registry import rollback as run_rollback

    old, new = run_rollback(name, reason)
    typer.echo(f"{name}: champion v{old} -> v{new}")


@app.command()
def history(name: str = typer.Option("liver-unet", help="served registered model")) -> None:
    """Every change of @champion (promote, rollback), newest first: when, who, from -> to, scores, reason."""
    from liverseg.history import history as changes
    from liverseg.tracking import client

    found = changes(client(), name)
    typer.echo("\n".join(c.line() for c in found) if found else f"{name}: the champion never changed")


users_app = typer.Typer(
    no_args_is_help=True, help="Team accounts on the MLflow server (admin login from the environment)."
)
app.add_typer(users_app, name="users")


@users_app.command("add")
def users_add(
    username: str = typer.Argument(..., help="login name"),
    role: str = typer.Option(
        ...,
        help="reader (read only: serving accounts) | scientist (train, tune, register candidates) "
        "| release (also promote, roll back)",
    ),
    password: str | None = typer.Option(
        None,
        help="visible to every local user in the process list (/proc/*/cmdline) and kept in shell history: "
        "prefer --password-stdin. Default: a generated one, printed once",
    ),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="read the password from stdin (a pipe)"),
    name: str = typer.Option("liver-unet", help="served registered model the role applies to"),
) -> None:
    """Create a user with a role's permissions (needs LIVERSEG_ADMIN_USER / LIVERSEG_ADMIN_PASSWORD)."""
    import sys

    from liverseg.team import TeamError, add_user, grants, password_from_stdin

    if password_stdin:
        if password is not None:
            raise TeamError("--password and --password-stdin: give one of them")
        password = password_from_stdin(sys.stdin.read())
    pw = add_user(username, role, password, name)
    granted = ", ".join(f"{p} on {m}" for _, m, p in grants(role, name))
    typer.echo(f"user {username} ({role}): " + (f"{granted}; " if granted else "") + "READ on everything else")
    if password is None:
        typer.echo(f"password for {username} (shown once): {pw}")


@app.command()
def lineage(uri: str = typer.Argument(..., help="models:/NAME@ALIAS or models:/NAME/VERSION")) -> None:
    """Print model version -> training run -> git commit -> DVC data hash -> store cases and split."""
    from liverseg.registry import lineage as run_lineage

    typer.echo("\n".join(run_lineage(uri)))


@app.command()
def predict(
    src: Path = typer.Argument(..., help="CT volume .nii[.gz], or a folder of them"),
    dst: Path = typer.Argument(..., help="mask .nii.gz, or an output folder"),
    model: str = typer.Option("models:/liver-unet@champion", help="MLflow model URI"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    lcc: bool = typer.Option(True, "--lcc/--no-lcc", help="3-D largest-connected-component clean-up"),
    overlay: Path | None = typer.Option(None, help="single file: also write a PNG of the mask over the CT"),
    truth: Path | None = typer.Option(None, help="single file: a segmentation to draw in the overlay too"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing output files"),
) -> None:
    """Segment CT volumes into uint8 liver masks on each input's own grid (shape and affine)."""
    from liverseg.artifact import load_model
    from liverseg.predict import plan, predict_jobs

    jobs = plan(src, dst, overwrite, overlay, truth)  # before the model: a typo costs no load
    lm = load_model(model, device)
    report = predict_jobs(lm, jobs, lcc, overwrite, overlay, truth, progress=src.is_dir())
    for msg in report.failed.values():
        typer.echo(f"FAILED {msg}", err=True)
    if src.is_dir():
        typer.echo(f"predict: {len(report.written)} masks written to {dst}, {len(report.failed)} failed")
    elif report.written:
        times = ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items())
        typer.echo(f"wrote {dst}{f' and {overlay}' if overlay else ''} ({times})")
    raise typer.Exit(1 if report.failed else 0)


@app.command()
def serve(
    model: str = typer.Option("models:/liver-unet@champion", help="MLflow model URI (an alias is followed)"),
    host: str = typer.Option("127.0.0.1", help="bind address; 0.0.0.0 only behind a proxy you trust"),
    port: int = typer.Option(8080, help="TCP port"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    max_mb: int = typer.Option(512, help="largest accepted upload (MiB)"),
    config: Path | None = typer.Option(None, "--config", "-c", help="serve YAML (pipelines/serve.yaml)"),
    set_: list[str] | None = SetOpt,
) -> None:
    """Serve the model over REST: POST /segment, GET /health, GET /model, POST /reload, POST /webhook.

    Follows the alias of --model: on MLflow's signed webhook (secret in LIVERSEG_WEBHOOK_SECRET) and by
    polling every serve.poll_s seconds. POST /reload needs Authorization: Bearer $LIVERSEG_RELOAD_TOKEN.
    """
    from liverseg.config import ServeConfig
    from liverseg.serve import serve as run_serve

    cfg = _load(ServeConfig, config, set_, None, "serve")
    run_serve(model, host, port, device, max_mb * 1024 * 1024, cfg.serve)


webhook_app = typer.Typer(no_args_is_help=True, help="MLflow registry webhooks that tell replicas of new aliases")
app.add_typer(webhook_app, name="webhook")


@webhook_app.command("add")
def webhook_add(
    urls: list[str] = typer.Argument(..., help="replica webhook URLs, e.g. http://serve-0:8080/webhook"),
) -> None:
    """Register (or refresh) a model_version_alias.created webhook per replica URL (MLflow admin;
    secret from LIVERSEG_WEBHOOK_SECRET, the same one the replicas read)."""
    from liverseg.webhook import add_webhook

    for url in urls:
        hook = add_webhook(url)
        typer.echo(f"webhook {hook.webhook_id} -> {url} ({', '.join(str(e) for e in hook.events)})")


@webhook_app.command("remove")
def webhook_remove(urls: list[str] = typer.Argument(..., help="replica webhook URLs")) -> None:
    """Delete the webhooks that deliver to these URLs."""
    from liverseg.webhook import remove_webhook

    for url in urls:
        typer.echo(f"removed {remove_webhook(url)} webhook(s) -> {url}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
