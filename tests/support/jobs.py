"""Rows for queue and worker tests: a tenant, a model and a batch to hang diagnoses on.

The queue tests need only rows (no bytes behind them); the worker tests store real bytes
through the blob store (see `make_uploaded_owner`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy.orm import Session

from service.config import Settings
from service.db.models import BatchRecord, Blob, Diagnosis, ModelRecord, Tenant, new_id
from service.db.session import Database
from service.queue import jobs as diagnoses_repo


@dataclass(frozen=True)
class Owner:
    tenant_id: str
    model_id: str
    batch_id: str


def make_owner(session: Session, *, model_bytes: bytes = b"m", batch_bytes: bytes = b"b") -> Owner:
    """A tenant with one model and one batch whose blob rows exist (bytes not stored)."""
    tenant = Tenant(name=f"tenant-{new_id()[:8]}")
    session.add(tenant)
    session.flush()
    digests = []
    for data in (model_bytes, batch_bytes):
        digest = hashlib.sha256(data).hexdigest()
        if session.get(Blob, digest) is None:
            session.add(Blob(sha256=digest, size_bytes=len(data), complete=True))
            session.flush()
        digests.append(digest)
    model = ModelRecord(
        tenant_id=tenant.id, name="net", sha256=digests[0], size_bytes=len(model_bytes)
    )
    batch = BatchRecord(tenant_id=tenant.id, sha256=digests[1], size_bytes=len(batch_bytes))
    session.add_all([model, batch])
    session.flush()
    return Owner(tenant.id, model.id, batch.id)


def enqueue_diagnosis(session: Session, owner: Owner, *, max_attempts: int = 3) -> Diagnosis:
    """A diagnose job queued the way the API queues it."""
    return diagnoses_repo.enqueue(
        session,
        owner.tenant_id,
        kind="diagnose",
        model_id=owner.model_id,
        batch_id=owner.batch_id,
        options={},
        max_attempts=max_attempts,
    )


def claim_until_empty(
    settings_kwargs: dict[str, object], worker_id: str, start: object, results: object
) -> None:
    """A claimer process for the concurrency tests: wait at the barrier `start`, then claim and
    complete jobs until none is left; put the ids it completed on the queue `results`."""
    from service.config import Settings
    from service.db.session import Database
    from service.queue import jobs

    settings = Settings(**settings_kwargs)  # type: ignore[arg-type]
    database = Database.from_settings(settings)
    done: list[str] = []
    start.wait()  # type: ignore[attr-defined]
    try:
        while True:
            with database.session() as session:
                job = jobs.claim(session, worker_id, lease_s=60)
                session.commit()
            if job is None:
                break
            with database.session() as session:
                assert jobs.complete(session, job.id, report={"by": worker_id}, verdict="healthy")
                session.commit()
            done.append(job.id)
    finally:
        results.put((worker_id, done))  # type: ignore[attr-defined]
        database.dispose()


def store_bytes(settings: Settings, database: Database, data: bytes, field: str = "file") -> str:
    """Put `data` in the blob store the way an upload does; returns its sha256."""
    from service.storage.blobs import BlobStore
    from service.storage.spool import SpooledUpload

    upload = SpooledUpload(
        settings.upload_tmp_dir, max_bytes=len(data) + 1, field=field, filename=None
    )
    upload.write(data)
    upload.finish()
    return BlobStore(settings, database).save(upload).sha256


def make_uploaded_owner(
    settings: Settings, database: Database, model_bytes: bytes, batch_bytes: bytes
) -> Owner:
    """Like `make_owner`, with the bytes really stored (workers read them)."""
    store_bytes(settings, database, model_bytes, "model")
    store_bytes(settings, database, batch_bytes, "batch")
    with database.session() as session:
        owner = make_owner(session, model_bytes=model_bytes, batch_bytes=batch_bytes)
        session.commit()
    return owner
