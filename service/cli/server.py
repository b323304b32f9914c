"""`gradhealth migrate`, `gradhealth api`, `gradhealth serve` (CONTRACT.md §2).

`serve` is the one-command local service: it migrates the configured database (the embedded
SQLite file by default), creates an API key for a `default` tenant on first start and prints it,
then runs the API, an in-process worker pool (`service.workers.supervisor.Supervisor`) and the
scheduler loop (`service.scheduler.loop.SchedulerLoop`, a thread: /v1/schedules).
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from service.cli import app

DEFAULT_TENANT = "default"
log = logging.getLogger("gradhealth.serve")


def settings_or_exit() -> Any:
    """The settings from the environment; on a bad GRADHEALTH_* value one line per bad setting
    on stderr, naming its variable, and exit 2."""
    from pydantic import ValidationError

    from service.config import Settings, describe_settings_error

    try:
        return Settings()
    except ValidationError as exc:
        for line in describe_settings_error(exc):
            typer.echo(f"gradhealth: bad configuration: {line}", err=True)
        raise typer.Exit(2) from None


def _where(settings: Any) -> str:
    from sqlalchemy import make_url

    return make_url(settings.effective_database_url).render_as_string(hide_password=True)


def _migrate(settings: Any) -> str | None:
    from service.db.migrate import upgrade

    try:
        return upgrade(settings)
    except Exception as exc:  # connection refused, bad URL, …: say which database
        typer.echo(f"gradhealth: cannot migrate {_where(settings)}: {exc}", err=True)
        raise typer.Exit(3) from exc


@app.command("migrate")
def migrate_command() -> None:
    """Apply the Alembic migrations to the configured database (GRADHEALTH_DATABASE_URL)."""
    settings = settings_or_exit()
    revision = _migrate(settings)
    typer.echo(f"{_where(settings)} is at revision {revision}")


def _uvicorn(app_: Any, host: str, port: int) -> None:
    import uvicorn

    uvicorn.Server(uvicorn.Config(app_, host=host, port=port, log_level="info")).run()


@app.command("api")
def api_command(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    processes: Annotated[
        int, typer.Option(min=1, help="API processes sharing the port (uvicorn workers)")
    ] = 1,
) -> None:
    """Run the REST API alone (workers run elsewhere: `gradhealth worker`)."""
    from service.api.app import create_app

    settings = settings_or_exit()
    if processes == 1:
        _uvicorn(create_app(settings), host, port)
        return
    import uvicorn

    # Each process builds its own app (and connection pool) from the same environment.
    uvicorn.run(
        "service.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=processes,
        log_level="info",
    )


def ensure_default_key(settings: Any) -> str | None:
    """On a database without any API key: a key for the `default` tenant (returned once)."""
    from service.auth import issue_api_key
    from service.db.repositories import tenants as tenants_repo
    from service.db.session import Database

    database = Database.from_settings(settings)
    try:
        with database.session() as session:
            if tenants_repo.count_keys(session):
                return None
            issued = issue_api_key(session, DEFAULT_TENANT)
            session.commit()
            return issued.key
    finally:
        database.dispose()


def detect_gpus() -> list[int]:
    """GPU indexes from `nvidia-smi -L`, without importing torch in the API process."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return list(range(sum(1 for line in out.splitlines() if line.startswith("GPU"))))


def _parse_gpus(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError as exc:
        typer.echo(f"gradhealth: --gpus takes indexes like 0,1 (got {value!r})", err=True)
        raise typer.Exit(2) from exc


def start_worker_pool(
    settings: Any, workers: int | None, gpus: list[int] | None, grace_s: float | None = None
) -> Any:
    try:
        from service.workers.supervisor import Supervisor
    except ImportError as exc:
        typer.echo(f"gradhealth: no worker pool available ({exc}); serving the API alone", err=True)
        return None
    if workers is None and gpus is None:
        gpus = detect_gpus() or None
    from service.workers.supervisor import GRACEFUL_STOP_S

    supervisor = Supervisor(
        settings,
        cpus=None if gpus else (workers or 1),
        gpus=gpus,
        grace_s=GRACEFUL_STOP_S if grace_s is None else grace_s,
    )
    supervisor.start()
    return supervisor


def start_scheduler(settings: Any, public_url: str) -> Any:
    """The schedules' loop in a daemon thread (several `serve`s on one Postgres are fine)."""
    from service.scheduler.loop import SchedulerLoop

    scheduler = SchedulerLoop(settings, public_url=public_url)
    scheduler.start()
    return scheduler


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _on_stop_signals(handler: Callable[[int, Any], None]) -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def _ignore_stop_signal(_signum: int, _frame: Any) -> None:
    """Installed while uvicorn runs. uvicorn handles SIGINT/SIGTERM itself (graceful HTTP
    shutdown), then restores the previous handlers and raises the signal again: with Python's
    default SIGTERM that killed the process before the worker pool could stop, orphaning a
    running job's child. Here the raised signal is a no-op and `serve` stops the pool itself."""


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    workers: Annotated[
        int | None,
        typer.Option(min=0, help="CPU worker processes (0: API only); default one per GPU, or 1"),
    ] = None,
    gpus: Annotated[
        str | None, typer.Option(help="GPU indexes for the workers, e.g. 0,1 (one child per GPU)")
    ] = None,
    public_url: Annotated[
        str,
        typer.Option(
            envvar="GRADHEALTH_PUBLIC_URL",
            help="the API's address in schedule webhooks' report_url (default: --host/--port)",
        ),
    ] = "",
    grace: Annotated[
        float,
        typer.Option(
            min=0, help="seconds running jobs get to finish on SIGTERM/Ctrl-C before requeueing"
        ),
    ] = 30.0,
) -> None:
    """API + in-process worker pool: the one-command local service (SQLite by default)."""
    from service.api.app import create_app

    settings = settings_or_exit()
    gpu_list = _parse_gpus(gpus)
    _migrate(settings)
    key = ensure_default_key(settings)
    url = f"http://{host}:{port}"
    typer.echo(f"gradhealth serving {url}  (OpenAPI UI: {url}/docs)  database: {_where(settings)}")
    if key is not None:
        typer.echo(
            f"API key for tenant '{DEFAULT_TENANT}' (shown once; send as "
            f"'Authorization: Bearer <key>'):\n{key}"
        )
    sys.stdout.flush()
    supervisor = None if workers == 0 else start_worker_pool(settings, workers, gpu_list, grace)
    scheduler = start_scheduler(settings, public_url or url)
    # SIGTERM (docker stop, systemd) and Ctrl-C alike: uvicorn stops serving, then the pool
    # stops claiming, lets running jobs finish for --grace seconds and requeues the rest
    # without counting the attempt; a second signal requeues them at once.
    _on_stop_signals(_ignore_stop_signal)
    try:
        _uvicorn(create_app(settings), host, port)
    finally:
        scheduler.stop()
        if supervisor is not None:
            _on_stop_signals(lambda _signum, _frame: supervisor.stop())
            typer.echo(
                f"gradhealth: stopping the workers: running jobs get {grace:g} s to finish, then "
                "go back to the queue (signal again to requeue them now)",
                err=True,
            )
            supervisor.stop()
            supervisor.join()
            typer.echo("gradhealth: workers stopped", err=True)
