"""How an idle worker learns that there is work: Postgres `LISTEN`, or polling on SQLite.

`Listener` holds one autocommit psycopg connection that LISTENs on the queue's channels. Its
`fileno()` goes into the supervisor's `select` beside the children's pipes, so one wait covers
"a child finished", "a job was queued" and "stop". If the connection
drops, the listener reconnects on the next `drain()` and the supervisor meanwhile polls at
`POLL_INTERVAL_POSTGRES_S` (which also catches retries whose backoff ends without a NOTIFY).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg
from sqlalchemy.engine import make_url

from service.queue.jobs import QUEUE_CHANNEL

log = logging.getLogger(__name__)

# Without a notification, how often an idle worker looks at the queue anyway.
POLL_INTERVAL_SQLITE_S = 0.05  # the cheap `has_available` read; submit→start latency ~ half this
POLL_INTERVAL_POSTGRES_S = 2.0  # NOTIFY wakes earlier; this catches ends of retry backoffs


@dataclass
class Wakeups:
    new_job: bool = False


def libpq_url(sqlalchemy_url: str) -> str:
    """`postgresql+psycopg://…` → `postgresql://…` for a raw psycopg connection."""
    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def is_postgres_url(sqlalchemy_url: str) -> bool:
    return make_url(sqlalchemy_url).get_backend_name() == "postgresql"


class Listener:
    """LISTEN on the queue's channels (Postgres only)."""

    def __init__(self, database_url: str) -> None:
        self._conninfo = libpq_url(database_url)
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._connect()

    def _connect(self) -> None:
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
            conn.execute(f"LISTEN {QUEUE_CHANNEL}")
        except psycopg.Error as exc:
            log.warning("cannot LISTEN on Postgres (%s); polling instead", exc)
            self._conn = None
            return
        self._conn = conn

    def fileno(self) -> int | None:
        return None if self._conn is None or self._conn.closed else self._conn.fileno()

    def drain(self) -> Wakeups:
        """Everything received so far, without blocking. After a reconnect, reports a new job
        (one may have been queued while nobody listened)."""
        wakeups = Wakeups()
        if self._conn is None or self._conn.closed:
            self._connect()
            wakeups.new_job = True
            return wakeups
        try:
            for _note in self._conn.notifies(timeout=0.0):
                wakeups.new_job = True
        except psycopg.Error as exc:
            log.warning("lost the LISTEN connection (%s); reconnecting", exc)
            self.close()
            wakeups.new_job = True
        return wakeups

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
