"""Engine and session factory built from `Settings`.

Postgres (psycopg 3): a connection pool with pre-ping, ordinary `BEGIN`.

The embedded SQLite file: WAL (readers never block the writer), a busy timeout, foreign keys on,
and every transaction opened with `BEGIN IMMEDIATE`. Why IMMEDIATE: with the default deferred
`BEGIN` a transaction that reads and then writes (a queue claim, a version bump) can fail at once
with SQLITE_BUSY when another connection wrote in between, and the busy timeout does not help
there. Taking the write lock up front serialises writers through the busy timeout instead;
the embedded mode is one machine, so that is cheap. Sessions opened with `read_only=True`
(GET requests, authentication) use a plain deferred `BEGIN`: in WAL mode readers never wait
for the writer and never hold it up. The pysqlite driver's own transaction
handling is switched off so that SQLAlchemy's `begin` event decides what is emitted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings

SQLITE_BUSY_TIMEOUT_MS = 30_000
READ_ONLY_OPTION = "gradhealth_read_only"


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # let the "begin" event below emit BEGIN
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        read_only = connection.get_execution_options().get(READ_ONLY_OPTION, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def create_db_engine(settings: Settings) -> Engine:
    url = settings.effective_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_pool_size,
        )
        _configure_sqlite(engine)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
    )


@dataclass
class Database:
    """One engine and its session factory; created once per process (API app, worker child)."""

    engine: Engine
    sessionmaker: sessionmaker[Session]

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        engine = create_db_engine(settings)
        return cls(engine=engine, sessionmaker=make_sessionmaker(engine))

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def new_session(self, *, read_only: bool = False) -> Session:
        """A session the caller closes. `read_only` promises no writes (on SQLite: no write
        lock is taken; see the module doc)."""
        if read_only:
            return self.sessionmaker(bind=self._read_only_engine)
        return self.sessionmaker()

    @contextmanager
    def session(self, *, read_only: bool = False) -> Iterator[Session]:
        """A session for one unit of work; the caller commits, anything uncommitted rolls back."""
        session = self.new_session(read_only=read_only)
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @property
    def _read_only_engine(self) -> Engine:
        # Shares the pool; only the begin event's behaviour differs.
        return self.engine.execution_options(**{READ_ONLY_OPTION: True})

    def dispose(self) -> None:
        self.engine.dispose()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: rows stay readable after the request boundary commits, so an
    # endpoint can commit and then build its response without another round trip.
    return sessionmaker(bind=engine, expire_on_commit=False)
