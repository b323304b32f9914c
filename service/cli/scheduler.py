"""`gradhealth scheduler`: the scheduler alone, for split deployments (`gradhealth api` +
`gradhealth worker` elsewhere). Every few seconds it queues the diagnoses of due schedules
and delivers finished runs' webhooks; several may run against one database, each tick runs
once (service.scheduler.due). `gradhealth serve` runs the same loop in a thread.

SIGTERM / Ctrl-C: finish the current pass and exit.
"""

from __future__ import annotations

import logging
import signal
from typing import Annotated, Any

import typer

from service.cli import app
from service.scheduler.loop import POLL_S

PUBLIC_URL_HELP = (
    "the API's address as webhook receivers reach it, put in front of report_url "
    "(e.g. https://gradhealth.example.com); empty: report_url is a path"
)


@app.command("scheduler")
def scheduler_command(
    public_url: Annotated[
        str, typer.Option(envvar="GRADHEALTH_PUBLIC_URL", help=PUBLIC_URL_HELP)
    ] = "",
    poll: Annotated[float, typer.Option(min=0.5, help="seconds between passes")] = POLL_S,
) -> None:
    """Queue the diagnoses of due schedules (/v1/schedules) and send their webhooks."""
    from service.cli.server import settings_or_exit
    from service.scheduler.loop import SchedulerLoop

    settings = settings_or_exit()
    _require_migrated(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    loop = SchedulerLoop(settings, public_url=public_url, poll_s=poll)

    def on_signal(signum: int, _frame: Any) -> None:
        loop.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    typer.echo("gradhealth scheduler running (Ctrl-C stops it)")
    loop.run()


def _require_migrated(settings: Any) -> None:
    from service.db.migrate import is_at_head
    from service.db.session import Database

    database = Database.from_settings(settings)
    try:
        migrated = is_at_head(database.engine)
    except Exception as exc:
        typer.echo(f"gradhealth: cannot reach the database: {exc}", err=True)
        raise typer.Exit(3) from exc
    finally:
        database.dispose()
    if not migrated:
        typer.echo(
            "gradhealth: the database is not migrated to the current schema; "
            "run `gradhealth migrate` first",
            err=True,
        )
        raise typer.Exit(2)
