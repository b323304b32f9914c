"""Alembic, driven from the package so that `gradhealth migrate` works from any directory.

The migration scripts live in `<repository>/migrations` (next to the `service` package; the
Docker image keeps that layout). `alembic.ini` at the repository root is only for people who
run the `alembic` command itself; the code builds its `Config` here.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

import service
from service.config import Settings
from service.db.session import create_db_engine
from service.errors import GradhealthError

MIGRATIONS_DIR = Path(service.__file__).resolve().parent.parent / "migrations"


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """A Config for our scripts. `env.py` uses `connection` when given (tests, `migrate`), else
    `url`, else `Settings()`: the URL is never written into the ini (a `%` in a password would
    break configparser interpolation)."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise GradhealthError(
            f"the Alembic migrations are not at {MIGRATIONS_DIR}: install gradhealth from its "
            "source tree (`pip install -e .`, as the Makefile and the Dockerfile do)",
            code="migrations_missing",
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    config.attributes["url"] = url
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def is_at_head(engine: Engine) -> bool:
    with engine.connect() as connection:
        return current_revision(connection) == head_revision()


def upgrade_engine(engine: Engine, revision: str = "head") -> None:
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection=connection), revision)


def upgrade(settings: Settings, revision: str = "head") -> str | None:
    """Apply the migrations to the configured database; returns the revision reached."""
    engine = create_db_engine(settings)
    try:
        upgrade_engine(engine, revision)
        with engine.connect() as connection:
            return current_revision(connection)
    finally:
        engine.dispose()
