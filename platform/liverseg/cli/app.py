"""The `liverseg` command: one thin sub-command per stage over the plain functions tests call."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from liverseg.core.errors import ConfigError, LiversegError


class _App(typer.Typer):
    """The command group. Every error liverseg raises on purpose is a LiversegError with a one-line
    message: it is printed here, once for all commands (exit 2 for a config error, 1 otherwise), and so
    are the failures of what a command talks to that it did not catch (`expected_failure`: MLflow, the
    network, object storage, the file system, memory); anything else is a bug and keeps its traceback."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except LiversegError as e:
            typer.echo(f"error: {e}", err=True)
            raise SystemExit(2 if isinstance(e, ConfigError) else 1) from None
        except Exception as e:
            msg = expected_failure(e)
            if msg is None:
                raise
            typer.echo(f"error: {msg}", err=True)
            raise SystemExit(1) from None


FOREIGN = ("mlflow.", "requests.", "urllib3.", "botocore.", "boto3.", "s3fs.", "aiobotocore.", "fsspec.")


def expected_failure(exc: BaseException) -> str | None:
    """One line for a failure of something outside liverseg (None for anything else, a bug): MLflow and the
    network said as `tracking.runs.failure` says them (unreachable, 401, 403, not found, 5xx); object
    storage (botocore, s3fs) and the file system by their own message; memory exhausted."""
    from liverseg.core.errors import one_line

    module = type(exc).__module__ + "."
    if module.startswith(("mlflow.", "requests.", "urllib3.")):
        from liverseg.tracking.runs import failure

        return str(failure(exc, "MLflow"))
    if isinstance(exc, MemoryError):
        return "out of memory (MemoryError): the input is larger than this machine can hold"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror}"
    if module.startswith(FOREIGN) or isinstance(exc, OSError):
        return one_line(exc)
    return None


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


def quietly(command: str, verbose: bool, fn):
    """`fn(console)` with library output in the command's log file (see liverseg.console). A failure ends
    in one line: liverseg's own message, or for anything else the root cause (traceback in the log), then
    the log file's path."""
    import traceback

    from liverseg.core.console import quiet, root_cause

    with quiet(command, verbose) as con:
        try:
            return fn(con)
        except LiversegError as e:
            msg, code = str(e), 2 if isinstance(e, ConfigError) else 1
        except KeyboardInterrupt:  # train/tune marked their MLflow runs KILLED on the way out
            msg, code = f"interrupted: {command} stopped, its MLflow runs marked KILLED (rerun to resume)", 130
        except Exception as e:
            traceback.print_exc()  # into the log
            msg, code = expected_failure(e) or root_cause(e), 1
        finally:  # Ray's last words (placement-group clean-up, worker exits) into the log, not after it
            ray = sys.modules.get("ray")
            if ray is not None and ray.is_initialized():
                ray.shutdown()
        msg += con.log_hint()
    fail(msg, code)


def keys_help(model_name: str) -> str:
    """`--help` epilog: every config key, its default and the reason for it."""
    from liverseg.core import config
    from liverseg.core.loading import PRECEDENCE, describe_keys

    rows = [(k, json.dumps(d), why) for k, d, why in describe_keys(getattr(config, model_name))]
    width = min(max(len(k) + len(d) for k, d, _ in rows) + 5, 60)
    lines = [f"  {k} = {d}".ljust(width) + f"  {why}" for k, d, why in rows]
    return f"Config keys (--set KEY=VALUE; precedence: {PRECEDENCE}):\n\n\b\n" + "\n".join(lines)


def load_stage(model, config, overrides, profile, stage):
    """The stage's config; without --config/--profile, pipelines/<stage>.yaml and pipelines/profile.yaml."""
    from liverseg.core.loading import default_profile, load_config

    if config is None and (PIPELINES / f"{stage}.yaml").exists():
        config = PIPELINES / f"{stage}.yaml"
    if profile is None:
        profile = default_profile(Path(config).parent if config else PIPELINES)
    cfg = load_config(model, config, overrides, profile=profile, stage=stage)
    typer.echo(f"{stage}: config {config or 'defaults'}, profile {profile or 'none'}", err=True)
    return cfg
