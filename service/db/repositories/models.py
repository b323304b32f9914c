"""Uploaded models: versions per (tenant, name), metadata filled by the worker's inspection."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import ModelRecord


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


def record_inspection(
    session: Session,
    model_id: str,
    *,
    format: str,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    parameter_count: int,
) -> None:
    """Worker side (no tenant filter: the job row already names the model): the inspection
    job's result. `inputs`/`outputs` are `TensorSpec` dicts (name, shape, dtype)."""
    record = session.get(ModelRecord, model_id)
    if record is None:
        return
    record.format = format
    record.inputs = inputs
    record.outputs = outputs
    record.parameter_count = parameter_count
    record.inspection_status = "succeeded"
    record.inspection_error = None


def record_inspection_failure(session: Session, model_id: str, message: str) -> None:
    record = session.get(ModelRecord, model_id)
    if record is None:
        return
    record.inspection_status = "failed"
    record.inspection_error = message
