"""Schedules (recurring health checks) and their runs: the queries, tenant-filtered for the
API; the scheduler's claim and webhook queries (all tenants) live in `service.scheduler`."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import Schedule
from service.db.repositories.diagnoses import Cursor
from service.db.repositories.pagination import newest_first_page


def get(session: Session, tenant_id: str, schedule_id: str) -> Schedule | None:
    return session.scalar(
        select(Schedule).where(Schedule.id == schedule_id, Schedule.tenant_id == tenant_id)
    )


def add(session: Session, schedule: Schedule) -> Schedule:
    session.add(schedule)
    session.flush()
    return schedule


def delete(session: Session, schedule: Schedule) -> None:
    session.delete(schedule)
    session.flush()


def list_page(
    session: Session, tenant_id: str, *, after: Cursor | None = None, limit: int = 50
) -> tuple[list[Schedule], Cursor | None]:
    """One page of the tenant's schedules, newest first."""
    query = select(Schedule).where(Schedule.tenant_id == tenant_id)
    return newest_first_page(
        session, query, Schedule.created_at, Schedule.id, after=after, limit=limit
    )
