"""`liverseg predict | serve | webhook`: masks from files, the REST service, its webhooks."""

from __future__ import annotations

from pathlib import Path

import typer

from liverseg.cli.app import SetOpt, app, load_stage
from liverseg.tracking.tags import CHAMPION, SERVED_MODEL

CHAMPION_URI = f"models:/{SERVED_MODEL}@{CHAMPION}"


@app.command()
def predict(
    src: Path = typer.Argument(..., help="CT volume .nii[.gz], or a folder of them"),
    dst: Path = typer.Argument(..., help="mask .nii.gz, or an output folder"),
    model: str = typer.Option(CHAMPION_URI, help="MLflow model URI"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    lcc: bool = typer.Option(True, "--lcc/--no-lcc", help="3-D largest-connected-component clean-up"),
    overlay: Path | None = typer.Option(None, help="single file: also write a PNG of the mask over the CT"),
    truth: Path | None = typer.Option(None, help="single file: a segmentation to draw in the overlay too"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing output files"),
) -> None:
    """Segment CT volumes into uint8 liver masks on each input's own grid (shape and affine)."""
    from liverseg.serving.predict import plan, predict_jobs
    from liverseg.tracking.models import load_model

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
    model: str = typer.Option(CHAMPION_URI, help="MLflow model URI (an alias is followed)"),
    host: str = typer.Option("127.0.0.1", help="bind address; 0.0.0.0 only behind a proxy you trust"),
    port: int = typer.Option(8080, help="TCP port"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    max_mb: int | None = typer.Option(
        None, help="largest accepted upload (MiB); the same as --set serve.max_upload_mb=N"
    ),
    shadow: str | None = typer.Option(
        None,
        help="a challenger that segments every request too, unseen (models:/NAME-candidates@challenger); serve.shadow",
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help="serve YAML (pipelines/serve.yaml)"),
    set_: list[str] | None = SetOpt,
) -> None:
    """Serve the model over REST: POST /segment, GET /health, GET /model, GET /metrics, POST /reload,
    POST /webhook.

    Follows the alias of --model: on MLflow's signed webhook (secret in LIVERSEG_WEBHOOK_SECRET) and by
    polling every serve.poll_s seconds. POST /reload needs Authorization: Bearer $LIVERSEG_RELOAD_TOKEN.
    With --shadow, only the champion answers; the shadow's agreement with it goes to /metrics and to
    MLflow (experiment liverseg-shadow; the replica's account needs the monitor role).
    """
    from liverseg.core.config import ServeConfig
    from liverseg.serving.server import serve as run_serve

    extra = [f"serve.max_upload_mb={max_mb}"] if max_mb is not None else []
    extra += [f"serve.shadow={shadow}"] if shadow else []
    cfg = load_stage(ServeConfig, config, [*(set_ or []), *extra], None, "serve")
    run_serve(model, host, port, device, cfg.serve)


webhook_app = typer.Typer(no_args_is_help=True, help="MLflow registry webhooks that tell replicas of new aliases")
app.add_typer(webhook_app, name="webhook")


@webhook_app.command("add")
def webhook_add(
    urls: list[str] = typer.Argument(..., help="replica webhook URLs, e.g. http://serve-0:8080/webhook"),
) -> None:
    """Register (or refresh) a model_version_alias.created webhook per replica URL (MLflow admin;
    secret from LIVERSEG_WEBHOOK_SECRET, the same one the replicas read)."""
    from liverseg.serving.webhook import add_webhook

    for url in urls:
        hook = add_webhook(url)
        typer.echo(f"webhook {hook.webhook_id} -> {url} ({', '.join(str(e) for e in hook.events)})")


@webhook_app.command("remove")
def webhook_remove(urls: list[str] = typer.Argument(..., help="replica webhook URLs")) -> None:
    """Delete the webhooks that deliver to these URLs."""
    from liverseg.serving.webhook import remove_webhook

    for url in urls:
        typer.echo(f"removed {remove_webhook(url)} webhook(s) -> {url}")
