"""Diagnoses: the requests clients see and, at the same time, the job queue's rows.

This module holds the client-side queries (enqueue, read, list, cancel). Claiming, leases and
heartbeats belong to the queue (`service.queue`), which works on the same table.

Enqueueing wakes idle Postgres workers with `NOTIFY` on `QUEUE_CHANNEL`, inside the enqueueing
transaction, so the notification is delivered only if the row is committed; SQLite workers poll.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from service.db.models import Diagnosis, utcnow

QUEUE_CHANNEL = "gradhealth_jobs"
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
KIND_DIAGNOSE = "diagnose"
KIND_INSPECT = "inspect"


def notify_workers(session: Session, job_id: str) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_notify(:channel, :job_id)"),
            {
                "channel": QUEUE_CHANNEL,
                "job_id": job_id,
            },
        )


def enqueue(
    session: Session,
    tenant_id: str,
    *,
    kind: str,
    model_id: str,
    batch_id: str | None,
    options: dict[str, Any],
    max_attempts: int,
    idempotency_key: str | None = None,
) -> Diagnosis:
    job = Diagnosis(
        tenant_id=tenant_id,
        kind=kind,
        model_id=model_id,
        batch_id=batch_id,
        options=options,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
        status="queued",
        available_at=utcnow(),
    )
    session.add(job)
    session.flush()
    notify_workers(session, job.id)
    return job


def get(
    session: Session, tenant_id: str, diagnosis_id: str, kind: str = KIND_DIAGNOSE
) -> Diagnosis | None:
    return session.scalar(
        select(Diagnosis).where(
            Diagnosis.id == diagnosis_id, Diagnosis.tenant_id == tenant_id, Diagnosis.kind == kind
        )
    )


def get_by_idempotency_key(session: Session, tenant_id: str, key: str) -> Diagnosis | None:
    return session.scalar(
        select(Diagnosis).where(Diagnosis.tenant_id == tenant_id, Diagnosis.idempotency_key == key)
    )


@dataclass(frozen=True)
class Cursor:
    """Position after the last item of a page: (created_at, id) of that item, newest first."""

    created_at: datetime
    id: str

    def encode(self) -> str:
        raw = json.dumps([self.created_at.isoformat(), self.id]).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, value: str) -> Cursor:
        """Raises ValueError for anything that is not a cursor this API handed out."""
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            created_at, last_id = json.loads(raw)
            return cls(created_at=datetime.fromisoformat(created_at), id=str(last_id))
        except (binascii.Error, ValueError, TypeError) as exc:
            raise ValueError(f"not a cursor from this API: {value!r}") from exc


def list_page(
    session: Session,
    tenant_id: str,
    *,
    model_id: str | None = None,
    status: str | None = None,
    after: Cursor | None = None,
    limit: int = 50,
) -> tuple[list[Diagnosis], Cursor | None]:
    """One page, newest first, and the cursor of the next page (None on the last page)."""
    query = select(Diagnosis).where(
        Diagnosis.tenant_id == tenant_id, Diagnosis.kind == KIND_DIAGNOSE
    )
    if model_id is not None:
        query = query.where(Diagnosis.model_id == model_id)
    if status is not None:
        query = query.where(Diagnosis.status == status)
    if after is not None:
        query = query.where(
            or_(
                Diagnosis.created_at < after.created_at,
                and_(Diagnosis.created_at == after.created_at, Diagnosis.id < after.id),
            )
        )
    rows = list(
        session.scalars(
            query.order_by(Diagnosis.created_at.desc(), Diagnosis.id.desc()).limit(limit + 1)
        )
    )
    if len(rows) <= limit:
        return rows, None
    page = rows[:limit]
    return page, Cursor(created_at=page[-1].created_at, id=page[-1].id)


def request_cancel(session: Session, job: Diagnosis) -> Diagnosis:
    """A queued job is cancelled at once; a running one is flagged (`cancel_requested`) and its
    worker stops it. Conditional UPDATEs, so a worker claiming the row at the same moment either
    sees `cancelled` or gets the flag. Returns the row as it is now."""
    now = utcnow()
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(Diagnosis)
        .where(Diagnosis.id == job.id, Diagnosis.status == "queued")
        .values(
            status="cancelled",
            cancel_requested=True,
            finished_at=now,
            error_code="cancelled",
            error_message="cancelled by the client before it started",
        )
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:
        session.execute(
            update(Diagnosis)
            .where(Diagnosis.id == job.id, Diagnosis.status.not_in(TERMINAL_STATUSES))
            .values(cancel_requested=True)
            .execution_options(synchronize_session=False)
        )
    session.refresh(job)
    return job


def count_by_status(session: Session) -> dict[str, int]:
    """All tenants: for /metrics only."""
    rows = session.execute(
        select(Diagnosis.kind, Diagnosis.status, func.count()).group_by(
            Diagnosis.kind, Diagnosis.status
        )
    ).all()
    return {f"{kind}:{status}": count for kind, status, count in rows}
