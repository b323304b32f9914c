"""`run_due_schedules(database, now)`: turn every due, enabled schedule into one queued
diagnosis, exactly once per tick however many schedulers run.

The claim. In ONE transaction: select due rows, then per row a conditional
`UPDATE schedules SET next_run_at = <next tick> WHERE id = … AND next_run_at = <seen>`, then
queue the diagnosis (the same `create_diagnosis` as POST /v1/diagnoses), then commit.
- Postgres: the select is `FOR UPDATE SKIP LOCKED`, so a concurrent scheduler skips rows
  another holds; once that one commits, the row's `next_run_at` is in the future and it is no
  longer due (Postgres re-checks the WHERE on the committed version).
- SQLite: every write transaction starts with `BEGIN IMMEDIATE` (service.db.session), so
  schedulers are serialised by the database; the conditional UPDATE is the claim (a loser
  updates 0 rows and queues nothing).
Belt and braces: the diagnosis carries the idempotency key `schedule:<id>:<tick>`, unique per
tenant, so even a claim that went wrong could not queue a tick twice.

Missed ticks (scheduler down, schedule disabled) are not replayed: a due schedule runs once
and `next_run_at` moves to the first tick after `now`. A tick whose previous run is still
queued or running queues nothing (`last_error` says why): no backlog behind stopped workers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.api.operations import create_diagnosis
from service.config import DEFAULT_MAX_ATTEMPTS
from service.db.models import Diagnosis, Schedule, ScheduleRun
from service.db.repositories import models as models_repo
from service.db.session import Database
from service.errors import GradhealthError
from service.scheduler.cron import next_tick

log = logging.getLogger("gradhealth.scheduler")

# Schedules claimed per transaction; a bigger backlog is worked through by the next calls.
CLAIM_BATCH = 100
WEBHOOK_PENDING = "pending"


@dataclass(frozen=True)
class ScheduledRun:
    schedule_id: str
    tick: datetime
    diagnosis_id: str | None  # None: the tick passed without a run (see the schedule's error)


def run_due_schedules(
    database: Database,
    now: datetime,
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    limit: int = CLAIM_BATCH,
) -> list[ScheduledRun]:
    """Queue one diagnosis per due schedule (at most `limit`) and advance each to its next
    tick after `now`. Returns what this call did; rows another scheduler holds are skipped."""
    with database.session() as session:
        due = _lock_due(session, now, limit)
        runs = [_run_one(session, schedule, now, max_attempts) for schedule in due]
        session.commit()
    return [run for run in runs if run is not None]


def _lock_due(session: Session, now: datetime, limit: int) -> list[Schedule]:
    query = (
        select(Schedule)
        .where(Schedule.enabled.is_(True), Schedule.next_run_at <= now)
        .order_by(Schedule.next_run_at)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return list(session.scalars(query))


def _claim(session: Session, schedule: Schedule, following: datetime) -> bool:
    claimed = session.execute(
        update(Schedule)
        .where(Schedule.id == schedule.id, Schedule.next_run_at == schedule.next_run_at)
        .values(next_run_at=following)
        .execution_options(synchronize_session=False)
    )
    return claimed.rowcount == 1  # type: ignore[attr-defined]


def _run_one(
    session: Session, schedule: Schedule, now: datetime, max_attempts: int
) -> ScheduledRun | None:
    tick = schedule.next_run_at
    following = next_tick(schedule.cron, schedule.timezone, now)
    if not _claim(session, schedule, following):
        return None  # another scheduler ran this tick
    schedule_id = schedule.id
    diagnosis_id: str | None = None
    error: str | None = None
    model = models_repo.latest_version(session, schedule.tenant_id, schedule.model_name)
    pending = _unfinished_previous_run(session, schedule)
    if pending is not None:  # no pile-up behind a stopped worker pool or a slow job
        error = (
            f"tick skipped: the previous run (diagnosis {schedule.last_diagnosis_id}) is still "
            f"{pending}; start a worker (gradhealth worker) or space the cron ticks further apart"
        )
    elif model is None:
        error = f"no model named {schedule.model_name!r} any more; upload one or change model_name"
    else:
        try:
            with session.begin_nested():
                job = create_diagnosis(
                    session,
                    schedule.tenant_id,
                    model_id=model.id,
                    batch_id=schedule.batch_id,
                    options=schedule.options,
                    max_attempts=max_attempts,
                    idempotency_key=f"schedule:{schedule_id}:{tick.isoformat()}",
                )
                diagnosis_id = job.id
                if not _has_run(session, job.id):  # the key answered an existing diagnosis
                    session.add(
                        ScheduleRun(
                            schedule_id=schedule_id,
                            diagnosis_id=job.id,
                            scheduled_for=tick,
                            webhook_url=schedule.webhook_url,
                            webhook_state=WEBHOOK_PENDING if schedule.webhook_url else None,
                            created_at=now,
                        )
                    )
                    session.flush()
        except GradhealthError as exc:  # e.g. options another version of gradhealth refuses
            error = exc.message
    values: dict[str, object] = {"last_run_at": now, "last_error": error}
    if diagnosis_id is not None:
        values["last_diagnosis_id"] = diagnosis_id
    session.execute(
        update(Schedule)
        .where(Schedule.id == schedule_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if error is not None:
        log.warning("schedule %s: tick %s queued nothing: %s", schedule_id, tick, error)
    return ScheduledRun(schedule_id=schedule_id, tick=tick, diagnosis_id=diagnosis_id)


def _unfinished_previous_run(session: Session, schedule: Schedule) -> str | None:
    """The status of the schedule's last diagnosis if it is still queued or running."""
    if schedule.last_diagnosis_id is None:
        return None
    status = session.scalar(
        select(Diagnosis.status).where(Diagnosis.id == schedule.last_diagnosis_id)
    )
    return status if status in ("queued", "running") else None


def _has_run(session: Session, diagnosis_id: str) -> bool:
    found = session.scalar(select(ScheduleRun.id).where(ScheduleRun.diagnosis_id == diagnosis_id))
    return found is not None
