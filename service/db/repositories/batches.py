"""Uploaded sample batches."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import BatchRecord
from service.db.repositories.diagnoses import Cursor
from service.db.repositories.pagination import newest_first_page


def get(session: Session, tenant_id: str, batch_id: str) -> BatchRecord | None:
    return session.scalar(
        select(BatchRecord).where(BatchRecord.id == batch_id, BatchRecord.tenant_id == tenant_id)
    )


def add(
    session: Session,
    tenant_id: str,
    *,
    sha256: str,
    size_bytes: int,
    filename: str | None,
    format: str,
    arrays: list[dict[str, Any]],
    arrays_complete: bool = True,
) -> BatchRecord:
    record = BatchRecord(
        tenant_id=tenant_id,
        sha256=sha256,
        size_bytes=size_bytes,
        filename=filename,
        format=format,
        arrays=arrays,
        arrays_complete=arrays_complete,
    )
    session.add(record)
    session.flush()
    return record


def list_page(
    session: Session, tenant_id: str, *, after: Cursor | None = None, limit: int = 50
) -> tuple[list[BatchRecord], Cursor | None]:
    """One page of the tenant's batches, newest first."""
    query = select(BatchRecord).where(BatchRecord.tenant_id == tenant_id)
    return newest_first_page(
        session, query, BatchRecord.created_at, BatchRecord.id, after=after, limit=limit
    )
