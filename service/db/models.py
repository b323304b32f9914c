"""SQLAlchemy 2 typed models. The schema itself is owned by the Alembic migrations in
`migrations/`; a test checks that autogenerate finds no difference between the two.

Every row that a client can see carries `tenant_id`, and every query filters by it.
The `diagnoses` table is also the job queue (DESIGN.md): a worker claims a queued row
(`FOR UPDATE SKIP LOCKED` on Postgres), holds a lease that its heartbeat extends, and writes
the report into the same row.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """`timestamptz` on Postgres; on SQLite (which stores text and drops the offset) values are
    written as UTC and read back as aware UTC datetimes, so code can compare them with
    `utcnow()` on both databases."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON,
    }


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)  # shown to people, not secret
    key_hash: Mapped[str] = mapped_column(String(128), unique=True)  # sha256 of the whole key
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Blob(Base):
    """Content-addressed bytes (one row per sha256). Stored as chunks in `blob_chunks` so that
    workers on other machines read uploads with only the database URL; the embedded mode may
    keep them as files under the data dir instead (`storage` says which)."""

    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage: Mapped[str] = mapped_column(String(16), default="db")  # "db" | "file"
    complete: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BlobChunk(Base):
    __tablename__ = "blob_chunks"
    sha256: Mapped[str] = mapped_column(
        ForeignKey("blobs.sha256", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ModelRecord(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("tenant_id", "name", "version"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer, default=1)
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # Filled by the worker-side inspection job, never by the API process (untrusted bytes).
    format: Mapped[str | None] = mapped_column(String(32), default=None)
    inspection_status: Mapped[str] = mapped_column(String(16), default="pending")
    inspection_error: Mapped[str | None] = mapped_column(Text, default=None)
    inputs: Mapped[list[Any] | None] = mapped_column(JSON, default=None)
    outputs: Mapped[list[Any] | None] = mapped_column(JSON, default=None)
    parameter_count: Mapped[int | None] = mapped_column(BigInteger, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BatchRecord(Base):
    __tablename__ = "batches"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str | None] = mapped_column(String(500), default=None)
    # npz | safetensors | pt, from the content (the API lists arrays from headers only).
    format: Mapped[str | None] = mapped_column(String(16), default=None)
    arrays: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # False for a .pt whose arrays cannot be listed without loading it (the worker does).
    arrays_complete: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Diagnosis(Base):
    """A diagnosis request, its job state and, once done, its report."""

    __tablename__ = "diagnoses"
    __table_args__ = (
        Index("ix_diagnoses_queue", "status", "available_at"),
        # The paginated list: newest first within a tenant, id as the tie-breaker of the cursor.
        Index("ix_diagnoses_tenant_listing", "tenant_id", "created_at", "id"),
        UniqueConstraint("tenant_id", "idempotency_key"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="diagnose")  # "diagnose" | "inspect"
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    # queued | running | succeeded | failed | cancelled
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    available_at: Mapped[datetime] = mapped_column(default=utcnow)  # not claimable before this
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    worker_id: Mapped[str | None] = mapped_column(String(200), default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    verdict: Mapped[str | None] = mapped_column(String(16), default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)


class Schedule(Base):
    """A recurring health check: every tick of `cron` (5 fields, read in `timezone`), a
    diagnosis of the LATEST version of `model_name` on `batch_id` is queued. By name, not by
    model id: a pipeline that uploads a new version of its model is checked on that version
    without editing the schedule. `next_run_at` is UTC; the scheduler claims a due row by
    advancing it (service.scheduler)."""

    __tablename__ = "schedules"
    __table_args__ = (
        # The scheduler's question every few seconds: which enabled rows are due?
        Index("ix_schedules_due", "enabled", "next_run_at"),
        Index("ix_schedules_tenant_listing", "tenant_id", "created_at", "id"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str] = mapped_column(String(200))
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    cron: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    webhook_url: Mapped[str | None] = mapped_column(String(2000), default=None)
    next_run_at: Mapped[datetime] = mapped_column()
    last_run_at: Mapped[datetime | None] = mapped_column(default=None)
    last_diagnosis_id: Mapped[str | None] = mapped_column(
        ForeignKey("diagnoses.id", ondelete="SET NULL"), default=None
    )
    # Why the last tick queued nothing (e.g. no model of that name any more); None after a run.
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ScheduleRun(Base):
    """One diagnosis a schedule queued, and the delivery state of its webhook. The webhook URL
    is copied at run time; `webhook_state`: pending → delivered | failed (after
    `webhook_attempts` tries), None when the schedule had no webhook."""

    __tablename__ = "schedule_runs"
    __table_args__ = (Index("ix_schedule_runs_webhook", "webhook_state", "webhook_next_at"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    schedule_id: Mapped[str] = mapped_column(
        ForeignKey("schedules.id", ondelete="CASCADE"), index=True
    )
    diagnosis_id: Mapped[str] = mapped_column(
        ForeignKey("diagnoses.id", ondelete="CASCADE"), unique=True
    )
    scheduled_for: Mapped[datetime] = mapped_column()
    webhook_url: Mapped[str | None] = mapped_column(String(2000), default=None)
    webhook_state: Mapped[str | None] = mapped_column(String(16), default=None)
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    webhook_next_at: Mapped[datetime | None] = mapped_column(default=None)
    webhook_delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    webhook_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
