"""The scheduler loop: every `POLL_S` seconds, queue the due schedules' diagnoses and deliver
finished runs' webhooks. Runs as a thread inside `gradhealth serve`, or alone as
`gradhealth scheduler`; any number of them may run against one database (see `due`).
`stop()` is safe from any thread or signal handler."""

from __future__ import annotations

import logging
import threading

from service.config import Settings
from service.db.models import utcnow
from service.db.session import Database
from service.scheduler.due import run_due_schedules
from service.scheduler.webhooks import deliver_webhooks

log = logging.getLogger("gradhealth.scheduler")
POLL_S = 5.0


class SchedulerLoop:
    def __init__(self, settings: Settings, *, public_url: str = "", poll_s: float = POLL_S) -> None:
        self.settings = settings
        self.public_url = public_url
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self, database: Database) -> None:
        """One pass. A failure (database restarting, …) is logged and retried next pass: the
        loop must outlive it."""
        try:
            run_due_schedules(database, utcnow(), max_attempts=self.settings.max_attempts)
            deliver_webhooks(database, utcnow(), public_url=self.public_url)
        except Exception:
            log.exception("scheduler pass failed; retrying in %.0f s", self.poll_s)

    def run(self) -> None:
        """Loop until `stop()`, in the calling thread."""
        database = Database.from_settings(self.settings)
        try:
            while not self._stop.is_set():
                self.tick(database)
                self._stop.wait(self.poll_s)
        finally:
            database.dispose()

    def start(self) -> None:
        """Loop in a daemon thread."""
        self._thread = threading.Thread(target=self.run, name="gradhealth-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
