"""`liverseg synth | ingest | publish`: phantoms, the slice store, its upload."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from liverseg.cli.app import ConfigOpt, ProfileOpt, SetOpt, VerboseOpt, app, fail, keys_help, load_stage, quietly


@app.command()
def synth(
    out: Path = typer.Option(..., help="folder for volume-N.nii.gz / segmentation-N.nii.gz"),
    cases: int = typer.Option(10, min=1, help="number of phantoms"),
    seed: int = typer.Option(0, help="same seed, byte-identical files"),
    shape: tuple[int, int, int] = typer.Option((128, 128, 64), help="X Y Z voxels"),
) -> None:
    """Write synthetic LiTS-like CT phantoms."""
    from liverseg.data.phantoms import write_phantoms

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
    from liverseg.core.config import IngestConfig
    from liverseg.data.ingest import ingest as run_ingest
    from liverseg.data.ingest import verify as run_verify
    from liverseg.data.store_folder import check_metrics_out

    if verify:
        problems = run_verify(str(store))
        for case, msg in problems.items():
            typer.echo(f"case {case}: {msg}", err=True)
        typer.echo(f"verify: {len(problems)} case(s) with problems")
        raise typer.Exit(1 if problems else 0)
    cfg = load_stage(IngestConfig, config, set_, profile, "ingest")

    def go(con):
        if out:
            check_metrics_out(out, raw, store)  # before the store is touched
        with contextlib.redirect_stderr(con.stream):  # the progress bar on the terminal
            report = run_ingest(raw, store, cfg, prune=prune)
        if out:
            _ingest_metrics(store, out)
        return report

    report = quietly("ingest", verbose, go)
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
    from liverseg.core.files import atomic_write_json
    from liverseg.data.store import SliceStore

    st = SliceStore(store)
    h, w = st.size
    counts = {f"{split}_cases": len(cases) for split, cases in st.splits.items()}
    slices = sum(st.num_slices(c) for c in st.cases)
    atomic_write_json(out, {"cases": len(st.cases), **counts, "slices": slices, "height": h, "width": w})


@app.command()
def publish(
    store: Path | None = typer.Option(None, help="local slice store written by `liverseg ingest`"),
    to: str = typer.Option(..., help="object-store URL, e.g. s3://bucket/stores/lits.zarr (AWS_* variables)"),
    keep: int | None = typer.Option(
        None, min=1, help="then delete all but the KEEP newest versions (never the current)"
    ),
    list_: bool = typer.Option(False, "--list", help="list the versions published at --to, newest first"),
) -> None:
    """Publish a slice store as a new immutable version at --to (readers see the old or the new one, never a
    mix; unchanged files are not sent again; old versions stay unless --keep); --list shows them."""
    from liverseg.data.publish import list_versions, prune_versions, publish_store

    if list_:
        current, manifests = list_versions(to)
        for m in manifests:
            mark = "  (current)" if m.version == current else ""
            typer.echo(f"{m.version}  {m.created_at}  by {m.by}  {m.cases} cases  {len(m.files)} files{mark}")
        if not manifests:
            typer.echo(f"{to}: no published versions")
        return
    if store is None:
        if keep is None:
            fail("give --store to publish, --keep N to delete old versions, or --list")
        typer.echo(f"publish: deleted {len(prune_versions(to, keep))} old version(s) at {to}")
        return
    rep = publish_store(store, to, keep=keep)
    if rep.previous == rep.version and not rep.uploaded:
        typer.echo(f"publish: {to} is already at version {rep.version} ({rep.cases} cases); nothing uploaded")
    else:
        was = "its first version" if rep.previous is None else f"was {rep.previous}"
        typer.echo(
            f"publish: {to} -> version {rep.version} ({rep.cases} cases, {was}): {len(rep.uploaded)} uploaded "
            f"({rep.bytes_uploaded / 1e6:.1f} MB), {len(rep.reused)} unchanged, in {rep.seconds:.1f} s"
        )
    pruned = f", {len(rep.pruned)} deleted (--keep {keep})" if rep.pruned else " (--keep N deletes old ones)"
    typer.echo(f"  {rep.versions} version(s) kept{pruned}; this one stays readable as {to}/versions/{rep.version}")
    if rep.extra:
        typer.echo(f"  kept at {to}, not part of any version: {', '.join(rep.extra[:5])}")
