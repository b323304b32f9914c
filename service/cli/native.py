"""`gradhealth build-native`: compile the engine's C++ parts for the installed torch.

Run once after installing (`make install` and the Dockerfile do). Without it diagnoses still
run, with the same results, on the slower Python loops. Exit status 1 when the build fails
(the message names what is missing: a C++ compiler, ninja).
"""

from __future__ import annotations

from typing import Annotated

import typer

from service.cli import app


@app.command("build-native")
def build_native_command(
    verbose: Annotated[bool, typer.Option(help="show the compiler's commands")] = False,
) -> None:
    """Compile the C++ recurrent loops (no-op when built for this source and torch)."""
    from service.engine.native import BuildError, build

    try:
        library = build(verbose=verbose)
    except BuildError as exc:
        typer.echo(f"gradhealth: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"built {library}")
