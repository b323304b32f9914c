"""`gradhealth migrate`, `gradhealth api`, `gradhealth serve` (CONTRACT.md §2).

`serve` is the one-command local service: it migrates the configured database (the embedded
SQLite file by default), creates an API key for a `default` tenant on first start and prints it,
then runs the API, an in-process worker pool (`service.workers.supervisor.Supervisor`) and the
scheduler loop (`service.scheduler.loop.SchedulerLoop`, a thread: /v1/schedules).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from typing import Annotated, Any

import typer

from service.cli import app

DEFAULT_TENANT = "default"
log = logging.getLogger("gradhealth.serve")


def _settings() -> Any:
    from pydantic import ValidationError

    from service.config import Settings

    try:
        return Settings()
    except ValidationError as exc:
        typer.echo(f"gradhealth: bad configuration: {exc}", err=True)
        raise typer.Exit(2) from exc


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
    settings = _settings()
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

    settings = _settings()
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


def start_worker_pool(settings: Any, workers: int | None, gpus: list[int] | None) -> Any:
    try:
        from service.workers.supervisor import Supervisor
    except ImportError as exc:
        typer.echo(f"gradhealth: no worker pool available ({exc}); serving the API alone", err=True)
        return None
    if workers is None and gpus is None:
        gpus = detect_gpus() or None
    supervisor = Supervisor(settings, cpus=None if gpus else (workers or 1), gpus=gpus)
    supervisor.start()
    return supervisor


def start_scheduler(settings: Any, public_url: str) -> Any:
    """The schedules' loop in a daemon thread (several `serve`s on one Postgres are fine)."""
    from service.scheduler.loop import SchedulerLoop

    scheduler = SchedulerLoop(settings, public_url=public_url)
    scheduler.start()
    return scheduler


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
) -> None:
    """API + in-process worker pool: the one-command local service (SQLite by default)."""
    from service.api.app import create_app

    settings = _settings()
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
    supervisor = None if workers == 0 else start_worker_pool(settings, workers, gpu_list)
    scheduler = start_scheduler(settings, public_url or url)
    try:
        _uvicorn(create_app(settings), host, port)
    finally:
        scheduler.stop()
        if supervisor is not None:
            supervisor.stop()
            supervisor.join()
