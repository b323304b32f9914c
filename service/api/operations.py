"""What the endpoints do, below HTTP: they take a session and a tenant id and never commit (the
endpoint, the request boundary, does). Every lookup is filtered by the tenant: another tenant's
id answers 404, exactly like an id that does not exist."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import BatchRecord, Diagnosis, ModelRecord
from service.db.repositories import batches as batches_repo
from service.db.repositories import diagnoses as diagnoses_repo
from service.db.repositories import models as models_repo
from service.engine.options import DiagnoseOptions
from service.errors import BadInputError, GradhealthError, NotFoundError
from service.queue import enqueue, enqueue_inspection, request_cancel
from service.storage import StoredBlob
from service.storage.batch_listing import BatchListing

MAX_NAME_LENGTH = 200
MAX_FILENAME_LENGTH = 500  # batches.filename: kept for people, never used as a path
VERSION_RETRIES = 5
FINISHED = frozenset({"succeeded", "failed", "cancelled"})


class BadOptionsError(BadInputError):
    code = "bad_options"


class ConflictError(GradhealthError):
    code = "conflict"
    status = 409


def model_name(name: str | None, filename: str | None) -> str:
    """The given name, else the uploaded file's name without its extension, else `model`."""
    given = (name or "").strip()
    if len(given) > MAX_NAME_LENGTH:
        raise BadInputError(f"the model name is longer than {MAX_NAME_LENGTH} characters")
    from_file = PurePath(filename).stem[:MAX_NAME_LENGTH] if filename else ""
    return given or from_file or "model"


def create_model(
    session: Session,
    tenant_id: str,
    *,
    name: str,
    blob: StoredBlob,
    format: str,
    max_attempts: int,
) -> ModelRecord:
    """A new version of `name` and its inspection job. Two uploads of one name at once race
    for the version number: the unique (tenant, name, version) decides, the loser retries."""
    for _ in range(VERSION_RETRIES):
        try:
            with session.begin_nested():
                version = models_repo.next_version(session, tenant_id, name)
                record = models_repo.add(
                    session,
                    tenant_id,
                    name=name,
                    version=version,
                    sha256=blob.sha256,
                    size_bytes=blob.size_bytes,
                    format=format,
                )
        except IntegrityError:
            continue
        enqueue_inspection(session, record, max_attempts=max_attempts)
        return record
    raise ConflictError(f"too many concurrent uploads of model '{name}'; retry")


def reuse_or_create_model(
    session: Session,
    tenant_id: str,
    *,
    name: str,
    blob: StoredBlob,
    format: str,
    max_attempts: int,
) -> ModelRecord:
    """For one-shot runs: pipelines send the same model again and again; its latest version
    is reused when the bytes are the same, instead of adding a version per run."""
    latest = models_repo.latest_version(session, tenant_id, name)
    if latest is not None and latest.sha256 == blob.sha256:
        return latest
    return create_model(
        session, tenant_id, name=name, blob=blob, format=format, max_attempts=max_attempts
    )


def create_batch(
    session: Session,
    tenant_id: str,
    *,
    blob: StoredBlob,
    filename: str | None,
    listing: BatchListing,
) -> BatchRecord:
    return batches_repo.add(
        session,
        tenant_id,
        sha256=blob.sha256,
        size_bytes=blob.size_bytes,
        filename=filename[:MAX_FILENAME_LENGTH] if filename else None,
        format=listing.format,
        arrays=listing.arrays,
        arrays_complete=listing.complete,
    )


def get_model(session: Session, tenant_id: str, model_id: str) -> ModelRecord:
    record = models_repo.get(session, tenant_id, model_id)
    if record is None:
        raise NotFoundError(f"no model with id {model_id!r} for this API key's tenant")
    return record


def get_batch(session: Session, tenant_id: str, batch_id: str) -> BatchRecord:
    record = batches_repo.get(session, tenant_id, batch_id)
    if record is None:
        raise NotFoundError(f"no batch with id {batch_id!r} for this API key's tenant")
    return record


def get_diagnosis(session: Session, tenant_id: str, diagnosis_id: str) -> Diagnosis:
    job = diagnoses_repo.get(session, tenant_id, diagnosis_id)
    if job is None:
        raise NotFoundError(f"no diagnosis with id {diagnosis_id!r} for this API key's tenant")
    return job


def build_options(overrides: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """`options` plus the top-level fields (loss, mode, …), validated as `DiagnoseOptions`;
    returns the full options (defaults included) so a stored job says exactly what ran."""
    merged = {**options, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        parsed = DiagnoseOptions.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise BadOptionsError(f"invalid diagnosis options: {problems}") from exc
    return parsed.model_dump(mode="json")


def create_diagnosis(
    session: Session,
    tenant_id: str,
    *,
    model_id: str,
    batch_id: str,
    options: dict[str, Any],
    max_attempts: int,
    idempotency_key: str | None,
) -> Diagnosis:
    """Queue a diagnosis. With an idempotency key already used by this tenant, the first
    diagnosis is returned (and a different request under the same key is refused)."""
    if idempotency_key is not None:
        existing = diagnoses_repo.get_by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is not None:
            return _same_request(existing, model_id, batch_id, options)
    get_model(session, tenant_id, model_id)
    get_batch(session, tenant_id, batch_id)
    try:
        with session.begin_nested():
            job = enqueue(
                session,
                tenant_id,
                kind=diagnoses_repo.KIND_DIAGNOSE,
                model_id=model_id,
                batch_id=batch_id,
                options=options,
                max_attempts=max_attempts,
                idempotency_key=idempotency_key,
            )
    except IntegrityError:
        # The same key arrived concurrently and the other request won.
        existing = (
            diagnoses_repo.get_by_idempotency_key(session, tenant_id, idempotency_key)
            if idempotency_key is not None
            else None
        )
        if existing is None:
            raise
        return _same_request(existing, model_id, batch_id, options)
    return job


def _same_request(
    existing: Diagnosis, model_id: str, batch_id: str, options: dict[str, Any] | None
) -> Diagnosis:
    if options is None:  # one-shot runs: the bytes are new uploads, the key alone decides
        return existing
    if (existing.model_id, existing.batch_id, existing.options) != (model_id, batch_id, options):
        raise ConflictError(
            "this Idempotency-Key was already used for a different request; "
            "use a new key for a new diagnosis"
        )
    return existing


def first_answer_for_key(session: Session, tenant_id: str, key: str | None) -> Diagnosis | None:
    if key is None:
        return None
    return diagnoses_repo.get_by_idempotency_key(session, tenant_id, key)


def cancel_diagnosis(session: Session, tenant_id: str, diagnosis_id: str) -> Diagnosis:
    job = get_diagnosis(session, tenant_id, diagnosis_id)
    if job.status in ("succeeded", "failed"):
        raise ConflictError(f"the diagnosis already {job.status}; there is nothing to cancel")
    return request_cancel(session, job)
