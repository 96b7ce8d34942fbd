"""The `liverseg` command: one thin sub-command per stage over the plain functions tests call."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

ConfigOpt = typer.Option(None, "--config", "-c", help="stage YAML (pipelines/<stage>.yaml)")
SetOpt = typer.Option(None, "--set", "-s", help="override key=value (YAML value, dotted key); repeatable")
ProfileOpt = typer.Option(None, "--profile", help="named profile from pipelines/profiles.yaml (demo, paper)")


def fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _load(model, config, overrides, profile, stage):
    from liverseg.config import ConfigError, load_config

    try:
        return load_config(model, config, overrides, profile=profile, stage=stage)
    except ConfigError as e:
        fail(str(e))


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


@app.command()
def ingest(
    raw: Path = typer.Option(..., help="LiTS folder: volume-N.nii[.gz] + segmentation-N.nii[.gz]"),
    store: Path = typer.Option(..., help="Zarr v3 slice store to create or update"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    profile: Optional[str] = ProfileOpt,
    verify: bool = typer.Option(False, "--verify", help="only check the store against its hashes"),
) -> None:
    """Convert LiTS NIfTI volumes into the sharded Zarr slice store (incremental, atomic per case)."""
    from liverseg.config import IngestConfig
    from liverseg.ingest import ingest as run_ingest, verify as run_verify
    from liverseg.lits import InputError
    from liverseg.store import StoreError

    if verify:
        try:
            problems = run_verify(str(store))
        except StoreError as e:
            fail(str(e), 1)
        for case, msg in problems.items():
            typer.echo(f"case {case}: {msg}", err=True)
        typer.echo(f"verify: {len(problems)} case(s) with problems")
        raise typer.Exit(1 if problems else 0)
    cfg = _load(IngestConfig, config, set_, profile, "ingest")
    try:
        report = run_ingest(raw, store, cfg)
    except (InputError, StoreError) as e:
        fail(str(e), 1)
    for msg in report.failed.values():
        typer.echo(f"FAILED {msg}", err=True)
    sizes = {k: len(v) for k, v in report.splits.items()}
    typer.echo(
        f"ingest: {len(report.written)} written, {len(report.skipped)} unchanged, "
        f"{len(report.failed)} failed; splits {sizes} -> {store}"
    )
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def train(
    store: str = typer.Option(..., help="slice store path or URL"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    profile: Optional[str] = ProfileOpt,
) -> None:
    """Train a U-Net on Ray Train from the slice store; tracked in MLflow (prints the run id)."""
    from liverseg.config import TrainConfig
    from liverseg.model import ModelError
    from liverseg.store import StoreError
    from liverseg.tracking import TrackingError
    from liverseg.train import TrainError, train as run_train

    cfg = _load(TrainConfig, config, set_, profile, "train")
    try:
        res = run_train(store, cfg)
    except (StoreError, TrackingError, TrainError, ModelError) as e:
        fail(str(e), 1)
    state = "already finished" if res.resumed_finished else "finished"
    typer.echo(f"run {res.run_name} {state}: mlflow run {res.run_id}, best val_dice {res.best_val_dice:.4f} "
               f"(epoch {res.best_epoch}), model {res.model_uri}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
