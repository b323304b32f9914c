"""`gradhealth keys create --tenant NAME`: a new API key (and the tenant if new). The key is
printed once, alone on the last line of stdout; only its hash is stored."""

from __future__ import annotations

from typing import Annotated

import typer

from service.cli import app

keys_app = typer.Typer(help="API keys for the REST API.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def create_key(
    tenant: Annotated[str, typer.Option(help="tenant name; created if it does not exist")],
) -> None:
    """Create an API key for TENANT and print it (once)."""
    from service.auth import issue_api_key
    from service.cli.server import settings_or_exit
    from service.db.migrate import is_at_head
    from service.db.session import Database

    if not tenant.strip() or len(tenant) > 200:
        typer.echo("gradhealth: --tenant must be a name of 1 to 200 characters", err=True)
        raise typer.Exit(2)
    database = Database.from_settings(settings_or_exit())
    try:
        if not is_at_head(database.engine):
            typer.echo(
                "gradhealth: the database is not migrated: run `gradhealth migrate`", err=True
            )
            raise typer.Exit(2)
        with database.session() as session:
            issued = issue_api_key(session, tenant.strip())
            session.commit()
    finally:
        database.dispose()
    created = " (new tenant)" if issued.tenant_created else ""
    typer.echo(f"API key {issued.prefix}… for tenant '{tenant.strip()}'{created}:")
    typer.echo(issued.key)
