"""The `liverseg` command (`liverseg.cli:app`, `python -m liverseg.cli`): one Typer app, one module of
thin sub-commands per room (data, training, registry and its governance, serving) registering on it, in the order `--help`
lists them."""

# isort: off
from liverseg.cli.app import app
from liverseg.cli import data, training, registry, governance, serving  # noqa: F401  (each registers its commands)

# isort: on


def main() -> None:  # pragma: no cover - console entry
    app()


__all__ = ["app", "main"]
