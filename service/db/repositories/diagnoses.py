"""Diagnoses: the requests clients see and, at the same time, the job queue's rows.

This module holds the client-side reads (one, by idempotency key, paginated list, counts).
Every state change (enqueue with its NOTIFY, claim, lease, cancel) belongs to the queue,
`service.queue`, which works on the same table.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from service.db.models import Diagnosis

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE_STATUSES = ("queued", "running")
KIND_DIAGNOSE = "diagnose"
KIND_INSPECT = "inspect"


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


def count_active(session: Session) -> dict[tuple[str, str], int]:
    """(kind, status) → rows, for queued and running jobs of all tenants (for /metrics). Only
    the unfinished states: they are the queue's depth, few rows, found through the
    (status, available_at) index; finished rows grow without bound."""
    rows = session.execute(
        select(Diagnosis.kind, Diagnosis.status, func.count())
        .where(Diagnosis.status.in_(ACTIVE_STATUSES))
        .group_by(Diagnosis.kind, Diagnosis.status)
    ).all()
    return {(kind, status): count for kind, status, count in rows}
