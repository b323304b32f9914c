"""The `gradhealth` command line (typer). Each command group lives in its own module and
registers itself on `app`; imports of torch and the database happen inside the commands so that
`gradhealth --help` stays fast."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="gradhealth",
    help="Find where gradients vanish or explode, and how to fix it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Find where gradients vanish or explode, and how to fix it."""
    # A callback keeps `app` a command group even while only one command is registered
    # (typer otherwise turns a single command into the whole program).


def main() -> None:
    from service.cli import commands  # noqa: F401  (registers the commands)

    app()
