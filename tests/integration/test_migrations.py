"""The migrations produce exactly the models' schema, and `gradhealth migrate` machinery works."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from service.db.migrate import head_revision, is_at_head, upgrade
from service.db.models import Base
from service.db.session import Database
from tests.conftest import Backend


def test_autogenerate_finds_no_difference_on_postgres(postgres_database: Database) -> None:
    with postgres_database.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_postgres_is_at_head(postgres_database: Database) -> None:
    assert head_revision() is not None
    assert is_at_head(postgres_database.engine)


def test_upgrade_creates_the_embedded_database_from_nothing(tmp_path: Path) -> None:
    from service.config import Settings

    settings = Settings(data_dir=tmp_path / "fresh", environment="test")
    assert upgrade(settings) == head_revision()
    database = Database.from_settings(settings)
    try:
        assert is_at_head(database.engine)
        with database.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        database.dispose()


def test_sqlite_backend_runs_in_wal_mode(sqlite_backend: Backend) -> None:
    with sqlite_backend.database.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
