"""The scheduler (service/scheduler) on real Postgres and SQLite: due schedules become exactly
one diagnosis per tick even with concurrent schedulers, missed ticks are skipped, ticks follow
the time zone's wall clock across DST, and webhooks reach a real local HTTP receiver once."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import func, select

from service.api.operations import build_options
from service.db.models import Diagnosis, ModelRecord, Schedule, ScheduleRun
from service.db.session import Database
from service.queue import jobs
from service.scheduler.cron import next_tick
from service.scheduler.due import run_due_schedules
from service.scheduler.manage import create_schedule
from service.scheduler.webhooks import MAX_WEBHOOK_ATTEMPTS, deliver_webhooks
from tests.conftest import Backend
from tests.support.jobs import Owner, make_owner

T0 = datetime(2026, 11, 26, 12, 0, 30, tzinfo=UTC)


@pytest.fixture
def database(backend: Backend) -> Database:
    return backend.database


@pytest.fixture
def owner(database: Database) -> Owner:
    with database.session() as session:
        result = make_owner(session)
        session.commit()
    return result


def _schedule(
    database: Database,
    owner: Owner,
    *,
    cron: str = "0 * * * *",
    timezone: str = "UTC",
    now: datetime = T0,
    webhook_url: str | None = None,
) -> str:
    with database.session() as session:
        schedule = create_schedule(
            session,
            owner.tenant_id,
            model_name="net",
            batch_id=owner.batch_id,
            cron=cron,
            timezone=timezone,
            enabled=True,
            webhook_url=webhook_url,
            options=build_options({}, {}),
            now=now,
        )
        session.commit()
        return schedule.id


def _row(database: Database, schedule_id: str) -> Schedule:
    with database.session() as session:
        return session.get_one(Schedule, schedule_id)


def _diagnoses(database: Database) -> list[Diagnosis]:
    with database.session() as session:
        return list(session.scalars(select(Diagnosis).where(Diagnosis.kind == "diagnose")))


def test_a_due_schedule_queues_one_diagnosis_and_moves_to_the_next_tick(
    database: Database, owner: Owner
) -> None:
    schedule_id = _schedule(database, owner)
    first_tick = datetime(2026, 11, 26, 13, 0, tzinfo=UTC)
    assert _row(database, schedule_id).next_run_at == first_tick
    assert run_due_schedules(database, first_tick - timedelta(seconds=1)) == []
    now = first_tick + timedelta(seconds=2)
    runs = run_due_schedules(database, now)
    assert [(r.schedule_id, r.tick) for r in runs] == [(schedule_id, first_tick)]
    [job] = _diagnoses(database)
    assert (job.status, job.model_id, job.batch_id) == ("queued", owner.model_id, owner.batch_id)
    assert job.options["mode"] == "train"
    row = _row(database, schedule_id)
    assert row.next_run_at == first_tick + timedelta(hours=1)
    assert (row.last_run_at, row.last_diagnosis_id, row.last_error) == (now, job.id, None)
    assert run_due_schedules(database, now) == []  # the same tick never runs twice


def test_missed_ticks_are_skipped_not_replayed(database: Database, owner: Owner) -> None:
    schedule_id = _schedule(database, owner)
    late = datetime(2026, 11, 26, 18, 20, tzinfo=UTC)  # five hourly ticks were missed
    assert len(run_due_schedules(database, late)) == 1
    assert len(_diagnoses(database)) == 1
    assert _row(database, schedule_id).next_run_at == datetime(2026, 11, 26, 19, 0, tzinfo=UTC)


def test_disabled_schedules_do_not_run(database: Database, owner: Owner) -> None:
    schedule_id = _schedule(database, owner)
    with database.session() as session:
        session.get_one(Schedule, schedule_id).enabled = False
        session.commit()
    assert run_due_schedules(database, T0 + timedelta(days=1)) == []
    assert _diagnoses(database) == []


def test_each_run_diagnoses_the_latest_version_of_the_model_name(
    database: Database, owner: Owner
) -> None:
    _schedule(database, owner)
    with database.session() as session:
        first = session.get_one(ModelRecord, owner.model_id)
        newer = ModelRecord(
            tenant_id=owner.tenant_id,
            name="net",
            version=2,
            sha256=first.sha256,
            size_bytes=first.size_bytes,
        )
        session.add(newer)
        session.commit()
    run_due_schedules(database, T0 + timedelta(hours=1))
    assert [job.model_id for job in _diagnoses(database)] == [newer.id]


def test_ticks_follow_the_wall_clock_across_a_dst_change(database: Database, owner: Owner) -> None:
    # Europe/Berlin moves from CET (UTC+1) to CEST (UTC+2) on 2026-03-29 at 02:00.
    schedule_id = _schedule(
        database,
        owner,
        cron="0 9 * * *",
        timezone="Europe/Berlin",
        now=datetime(2026, 3, 27, 12, 0, tzinfo=UTC),
    )
    seen = []
    for _ in range(3):
        tick = _row(database, schedule_id).next_run_at
        seen.append(tick)
        assert len(run_due_schedules(database, tick)) == 1
        _finish_queued(database)  # a worker ran it before the next day's tick
    assert [t.hour for t in seen] == [8, 7, 7]  # 09:00 local each day
    assert [t.day for t in seen] == [28, 29, 30]
    assert len(_diagnoses(database)) == 3


def test_dst_gaps_and_overlaps_run_once() -> None:
    # 02:30 does not exist in Berlin on 2026-03-29: it runs once, an hour later on the wall.
    assert next_tick("30 2 * * *", "Europe/Berlin", datetime(2026, 3, 28, 12, tzinfo=UTC)) == (
        datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    )
    # 02:30 exists twice on 2026-10-25: only the first one runs; the next is the day after.
    first = next_tick("30 2 * * *", "Europe/Berlin", datetime(2026, 10, 24, 12, tzinfo=UTC))
    assert first == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert next_tick("30 2 * * *", "Europe/Berlin", first) == datetime(
        2026, 10, 26, 1, 30, tzinfo=UTC
    )


def test_concurrent_schedulers_queue_exactly_one_diagnosis_per_tick(
    database: Database, owner: Owner
) -> None:
    ids = [_schedule(database, owner, cron="*/5 * * * *") for _ in range(20)]
    for round_ in range(3):
        now = T0 + timedelta(minutes=5 * (round_ + 1))
        start = threading.Barrier(2)
        results: list[int] = []

        def scheduler(
            at: datetime = now, barrier: threading.Barrier = start, done: list[int] = results
        ) -> None:
            barrier.wait()
            done.append(len(run_due_schedules(database, at)))

        threads = [threading.Thread(target=scheduler) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(results) == len(ids), results
        _finish_queued(database)  # workers ran this round before the next tick
    with database.session() as session:
        per_schedule = dict(
            session.execute(
                select(ScheduleRun.schedule_id, func.count()).group_by(ScheduleRun.schedule_id)
            ).all()
        )
    assert per_schedule == {schedule_id: 3 for schedule_id in ids}
    assert len(_diagnoses(database)) == 3 * len(ids)


class Receiver:
    """A real HTTP server on 127.0.0.1 recording the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def _finish(database: Database, diagnosis_id: str) -> None:
    with database.session() as session:
        assert jobs.complete(
            session, diagnosis_id, report={"verdict": "at_risk"}, verdict="at_risk"
        )
        session.commit()


def _finish_queued(database: Database) -> None:
    for job in _diagnoses(database):
        if job.status == "queued":
            _finish(database, job.id)


def test_a_tick_whose_previous_run_is_unfinished_queues_nothing_and_says_why(
    database: Database, owner: Owner
) -> None:
    """No backlog piles up behind a stopped worker pool: one queued run per schedule at most."""
    schedule_id = _schedule(database, owner)
    [first] = run_due_schedules(database, T0 + timedelta(hours=1))
    [skipped] = run_due_schedules(database, T0 + timedelta(hours=2))
    assert first.diagnosis_id is not None and skipped.diagnosis_id is None
    assert len(_diagnoses(database)) == 1
    row = _row(database, schedule_id)
    assert row.last_error is not None and "still queued" in row.last_error
    assert row.last_diagnosis_id == first.diagnosis_id
    assert row.next_run_at == datetime(2026, 11, 26, 15, 0, tzinfo=UTC)  # it moves on regardless
    _finish(database, first.diagnosis_id)
    [third] = run_due_schedules(database, T0 + timedelta(hours=3))
    assert third.diagnosis_id is not None and len(_diagnoses(database)) == 2
    assert _row(database, schedule_id).last_error is None


def test_the_webhook_is_delivered_once_when_the_diagnosis_finishes(
    database: Database, owner: Owner, receiver: Receiver
) -> None:
    schedule_id = _schedule(database, owner, webhook_url=receiver.url)
    now = T0 + timedelta(hours=1)
    [run] = run_due_schedules(database, now)
    assert run.diagnosis_id is not None
    assert deliver_webhooks(database, now) == []  # still queued: nothing to tell
    _finish(database, run.diagnosis_id)
    outcomes = deliver_webhooks(database, now, public_url="http://gh.example:8000/")
    assert [ok for _, ok in outcomes] == [True]
    assert receiver.bodies == [
        {
            "schedule_id": schedule_id,
            "diagnosis_id": run.diagnosis_id,
            "status": "succeeded",
            "verdict": "at_risk",
            "report_url": f"http://gh.example:8000/v1/diagnoses/{run.diagnosis_id}/report.html",
        }
    ]
    assert deliver_webhooks(database, now + timedelta(hours=1)) == []
    assert len(receiver.bodies) == 1
    with database.session() as session:
        record = session.scalars(select(ScheduleRun)).one()
        assert (record.webhook_state, record.webhook_attempts) == ("delivered", 1)


def test_a_failing_receiver_gets_a_bounded_number_of_attempts(
    database: Database, owner: Owner, receiver: Receiver
) -> None:
    receiver.status = 500
    _schedule(database, owner, webhook_url=receiver.url)
    now = T0 + timedelta(hours=1)
    [run] = run_due_schedules(database, now)
    assert run.diagnosis_id is not None
    with database.session() as session:
        assert jobs.fail(session, run.diagnosis_id, code="bad_batch", message="x") == "failed"
        session.commit()
    assert [ok for _, ok in deliver_webhooks(database, now)] == [False]
    assert deliver_webhooks(database, now) == []  # backing off: no storm
    for hour in range(1, 10):
        deliver_webhooks(database, now + timedelta(hours=hour))
    assert len(receiver.bodies) == MAX_WEBHOOK_ATTEMPTS
    assert receiver.bodies[0]["status"] == "failed" and receiver.bodies[0]["verdict"] is None
    with database.session() as session:
        record = session.scalars(select(ScheduleRun)).one()
        assert record.webhook_state == "failed"
        assert record.webhook_attempts == MAX_WEBHOOK_ATTEMPTS
        assert "500" in (record.webhook_error or "")


def test_an_unreachable_receiver_is_recorded_not_raised(database: Database, owner: Owner) -> None:
    _schedule(database, owner, webhook_url="http://127.0.0.1:9/nothing-listens")
    now = T0 + timedelta(hours=1)
    [run] = run_due_schedules(database, now)
    assert run.diagnosis_id is not None
    _finish(database, run.diagnosis_id)
    assert [ok for _, ok in deliver_webhooks(database, now, timeout_s=2)] == [False]
    with database.session() as session:
        assert "cannot reach" in (session.scalars(select(ScheduleRun)).one().webhook_error or "")
