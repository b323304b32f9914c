"""`gradhealth worker [--gpus 0,1 | --cpus N]`: a worker pool for the configured database.

For deployments where the API runs elsewhere (`gradhealth api`): point any number of these at
the same Postgres (GRADHEALTH_DATABASE_URL) on any number of machines; they share the queue.
Uploads are read through the database (blob chunks), cached on this machine by sha256; each
child keeps the models it loaded (parsed, converted) for the next job on the same file.

SIGTERM / Ctrl-C: stop claiming, let running jobs finish for `--grace` seconds, then give them
back to the queue; a second signal gives them back at once.
"""

from __future__ import annotations

import logging
import signal
from typing import Annotated, Any

import typer

from service.cli import app
from service.workers.loaded_cache import DEFAULT_LOADED_CACHE_BYTES


def _parse_gpus(value: str) -> list[int]:
    try:
        gpus = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        gpus = []
    if not gpus or any(g < 0 for g in gpus):
        typer.echo(f"gradhealth: --gpus takes GPU indexes like 0,1 (got {value!r})", err=True)
        raise typer.Exit(2)
    return gpus


@app.command("worker")
def worker_command(
    gpus: Annotated[
        str | None, typer.Option(help="GPU indexes, one child process per GPU, e.g. 0,1")
    ] = None,
    cpus: Annotated[
        int | None, typer.Option(min=1, help="number of CPU child processes (no GPU)")
    ] = None,
    grace: Annotated[
        float, typer.Option(min=0, help="seconds running jobs get to finish on SIGTERM")
    ] = 30.0,
    model_cache_mb: Annotated[
        int,
        typer.Option(
            min=0,
            help="per child: memory for loaded models kept between jobs (parameters + buffers, "
            "on the child's device), LRU; 0 keeps none",
        ),
    ] = DEFAULT_LOADED_CACHE_BYTES // 2**20,
) -> None:
    """Run diagnoses from the queue: one child per GPU (default: every GPU found), or N CPU
    children."""
    from service.cli.server import settings_or_exit

    if gpus is not None and cpus is not None:
        typer.echo("gradhealth: give --gpus or --cpus, not both", err=True)
        raise typer.Exit(2)
    gpu_list = _parse_gpus(gpus) if gpus is not None else None
    settings = settings_or_exit()
    if gpu_list is None and cpus is None:
        from service.cli.server import detect_gpus

        gpu_list = detect_gpus() or None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_pool(
        settings,
        cpus=None if gpu_list else (cpus or 1),
        gpus=gpu_list,
        grace_s=grace,
        loaded_cache_bytes=model_cache_mb * 2**20,
    )


def run_pool(
    settings: Any,
    *,
    cpus: int | None,
    gpus: list[int] | None,
    grace_s: float,
    loaded_cache_bytes: int = DEFAULT_LOADED_CACHE_BYTES,
) -> None:
    from service.db.migrate import is_at_head
    from service.db.session import Database
    from service.workers.supervisor import Supervisor

    database = Database.from_settings(settings)
    try:
        if not is_at_head(database.engine):
            typer.echo(
                "gradhealth: the database is not migrated to the current schema; "
                "run `gradhealth migrate` first",
                err=True,
            )
            raise typer.Exit(2)
    except typer.Exit:
        raise
    except Exception as exc:
        typer.echo(f"gradhealth: cannot reach the database: {exc}", err=True)
        raise typer.Exit(3) from exc
    finally:
        database.dispose()
    supervisor = Supervisor(
        settings, cpus=cpus, gpus=gpus, grace_s=grace_s, loaded_cache_bytes=loaded_cache_bytes
    )

    def on_signal(signum: int, _frame: Any) -> None:
        supervisor.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    where = f"GPUs {gpus}" if gpus else f"{cpus} CPU process(es)"
    typer.echo(f"gradhealth worker: {where}; SIGTERM finishes or requeues running jobs")
    supervisor.run_forever()
