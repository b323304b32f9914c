"""What a page is drawn from: the diagnosis row's fields plus its model's name, read inside
the request's session (`load_view`) and handed over as plain data: rendering never touches the
database."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from service.api.operations import get_diagnosis
from service.db.models import Diagnosis, ModelRecord
from service.db.repositories import models as models_repo


@dataclass(frozen=True)
class DiagnosisView:
    id: str
    status: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    max_attempts: int = 0
    cancel_requested: bool = False
    error_code: str | None = None
    error_message: str | None = None
    model_name: str | None = None
    model_version: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None

    @property
    def title(self) -> str:
        if self.model_name is None:
            return f"diagnosis {self.id}"
        version = f" v{self.model_version}" if self.model_version is not None else ""
        return f"{self.model_name}{version}"


def when(moment: datetime | None) -> str:
    return "—" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def view_of(job: Diagnosis, model: ModelRecord | None) -> DiagnosisView:
    """Copies what the page needs out of the rows (read inside the session)."""
    return DiagnosisView(
        id=job.id,
        status=job.status,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        cancel_requested=job.cancel_requested,
        error_code=job.error_code,
        error_message=job.error_message,
        model_name=model.name if model is not None else None,
        model_version=model.version if model is not None else None,
        options=dict(job.options or {}),
        report=job.report,
    )


def load_view(session: Session, tenant_id: str, diagnosis_id: str) -> DiagnosisView:
    """The tenant's diagnosis (404 for another tenant's, like every lookup) and its model."""
    job = get_diagnosis(session, tenant_id, diagnosis_id)
    return view_of(job, models_repo.get(session, tenant_id, job.model_id))
