"""Rows → response bodies."""

from __future__ import annotations

from service.api.schemas import (
    ArrayOut,
    BatchOut,
    DiagnosisOut,
    DiagnosisSummary,
    ErrorBody,
    InspectionOut,
    ModelOut,
    TensorSpecOut,
)
from service.db.models import BatchRecord, Diagnosis, ModelRecord


def model_out(record: ModelRecord) -> ModelOut:
    return ModelOut(
        id=record.id,
        name=record.name,
        version=record.version,
        sha256=record.sha256,
        format=record.format,
        size_bytes=record.size_bytes,
        inputs=[TensorSpecOut.model_validate(t) for t in record.inputs or []],
        outputs=[TensorSpecOut.model_validate(t) for t in record.outputs or []],
        parameter_count=record.parameter_count,
        inspection=InspectionOut(status=record.inspection_status, error=record.inspection_error),
        created_at=record.created_at,
    )


def batch_out(record: BatchRecord) -> BatchOut:
    return BatchOut(
        id=record.id,
        sha256=record.sha256,
        size_bytes=record.size_bytes,
        format=record.format or "unknown",
        filename=record.filename,
        arrays=[ArrayOut.model_validate(a) for a in record.arrays],
        arrays_complete=record.arrays_complete,
        created_at=record.created_at,
    )


def _summary_fields(job: Diagnosis) -> dict[str, object]:
    error = (
        ErrorBody(code=job.error_code, message=job.error_message or "") if job.error_code else None
    )
    return {
        "id": job.id,
        "status": job.status,
        "model_id": job.model_id,
        "batch_id": job.batch_id,
        "options": job.options,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "cancel_requested": job.cancel_requested,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "verdict": job.verdict,
        "error": error,
    }


def diagnosis_summary(job: Diagnosis) -> DiagnosisSummary:
    return DiagnosisSummary.model_validate(_summary_fields(job))


def diagnosis_out(job: Diagnosis) -> DiagnosisOut:
    return DiagnosisOut.model_validate({**_summary_fields(job), "report": job.report})
