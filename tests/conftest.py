"""Shared fixtures: real Postgres (migrated once per session, tables truncated before each test),
a SQLite variant (migrated once into a template file, copied per test), a tenant with an API key,
and an httpx client (starlette's TestClient) against the ASGI app.

Postgres URL: GRADHEALTH_TEST_DATABASE_URL, default
postgresql+psycopg://postgres@127.0.0.1:5432/gradhealth_test (`make test` creates it fresh; a
missing database is created here). Several people running tests at once should each point
GRADHEALTH_TEST_DATABASE_URL at their own database: each test truncates every table.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import create_engine, make_url, text

from service.config import Settings
from service.db.migrate import upgrade_engine
from service.db.models import Base
from service.db.session import Database

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

DEFAULT_TEST_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/gradhealth_test"


def postgres_test_url() -> str:
    return os.environ.get("GRADHEALTH_TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)


def _ensure_database_exists(url: str) -> None:
    target = make_url(url)
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": target.database}
            )
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{target.database}"'))
    finally:
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[Database]:
    """The session's Postgres, migrated to head once."""
    url = postgres_test_url()
    _ensure_database_exists(url)
    database = Database.from_settings(Settings(database_url=url, environment="test"))
    upgrade_engine(database.engine)
    yield database
    database.dispose()


def truncate_all(database: Database) -> None:
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with database.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file; each test gets a copy (cheaper than migrating per test)."""
    data_dir = tmp_path_factory.mktemp("sqlite-template")
    database = Database.from_settings(Settings(data_dir=data_dir, environment="test"))
    upgrade_engine(database.engine)
    database.dispose()  # closing the last connection checkpoints the WAL into the file
    return data_dir / "gradhealth.sqlite3"


@dataclass
class Backend:
    """One database under test with the settings that point at it."""

    name: str
    settings: Settings
    database: Database


@pytest.fixture
def postgres_backend(postgres_database: Database, tmp_path: Path) -> Backend:
    truncate_all(postgres_database)
    settings = Settings(
        database_url=postgres_test_url(), data_dir=tmp_path / "data", environment="test"
    )
    return Backend("postgres", settings, postgres_database)


@pytest.fixture
def sqlite_backend(sqlite_template: Path, tmp_path: Path) -> Iterator[Backend]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copyfile(sqlite_template, data_dir / sqlite_template.name)
    settings = Settings(data_dir=data_dir, environment="test")
    database = Database.from_settings(settings)
    yield Backend("sqlite", settings, database)
    database.dispose()


@pytest.fixture(params=["postgres", "sqlite"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Runs the test once on Postgres and once on SQLite."""
    return request.getfixturevalue(f"{request.param}_backend")


@dataclass
class TenantKey:
    tenant_id: str
    tenant_name: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_tenant_key(backend: Backend, name: str) -> TenantKey:
    from service.auth import issue_api_key

    with backend.database.session() as session:
        issued = issue_api_key(session, name)
        session.commit()
    return TenantKey(tenant_id=issued.tenant_id, tenant_name=name, key=issued.key)


@pytest.fixture
def tenant(backend: Backend) -> TenantKey:
    return make_tenant_key(backend, "acme")


@pytest.fixture
def other_tenant(backend: Backend) -> TenantKey:
    return make_tenant_key(backend, "globex")


def make_client(backend: Backend, **settings_overrides: Any) -> TestClient:
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    settings = backend.settings.model_copy(update=settings_overrides)
    return TestClient(create_app(settings, database=backend.database))


@pytest.fixture
def client(backend: Backend, tenant: TenantKey) -> Iterator[TestClient]:
    """Authenticated as `tenant`."""
    with make_client(backend) as test_client:
        test_client.headers.update(tenant.headers)
        yield test_client
