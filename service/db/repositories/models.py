"""Uploaded models: versions per (tenant, name). Their metadata (format, inputs, outputs,
parameter_count) is written by the worker's inspection job (`service.queue.complete_inspection`)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import ModelRecord
from service.db.repositories.diagnoses import Cursor
from service.db.repositories.pagination import newest_first_page


def get(session: Session, tenant_id: str, model_id: str) -> ModelRecord | None:
    return session.scalar(
        select(ModelRecord).where(ModelRecord.id == model_id, ModelRecord.tenant_id == tenant_id)
    )


def latest_version(session: Session, tenant_id: str, name: str) -> ModelRecord | None:
    return session.scalar(
        select(ModelRecord)
        .where(ModelRecord.tenant_id == tenant_id, ModelRecord.name == name)
        .order_by(ModelRecord.version.desc())
        .limit(1)
    )


def next_version(session: Session, tenant_id: str, name: str) -> int:
    current = session.scalar(
        select(func.max(ModelRecord.version)).where(
            ModelRecord.tenant_id == tenant_id, ModelRecord.name == name
        )
    )
    return (current or 0) + 1


def add(
    session: Session,
    tenant_id: str,
    *,
    name: str,
    version: int,
    sha256: str,
    size_bytes: int,
    format: str | None,
) -> ModelRecord:
    record = ModelRecord(
        tenant_id=tenant_id,
        name=name,
        version=version,
        sha256=sha256,
        size_bytes=size_bytes,
        format=format,
        inspection_status="pending",
    )
    session.add(record)
    session.flush()
    return record


def list_page(
    session: Session,
    tenant_id: str,
    *,
    name: str | None = None,
    after: Cursor | None = None,
    limit: int = 50,
) -> tuple[list[ModelRecord], Cursor | None]:
    """One page of the tenant's models (every version), newest first; `name`: that name only."""
    query = select(ModelRecord).where(ModelRecord.tenant_id == tenant_id)
    if name is not None:
        query = query.where(ModelRecord.name == name)
    return newest_first_page(
        session, query, ModelRecord.created_at, ModelRecord.id, after=after, limit=limit
    )
