"""A model name's history: the tenant's succeeded diagnoses of every version of one name,
newest first, read in two steps so that a page never loads whole reports.

1. `history_rows`: the page's rows without their reports (ids, version, batch, times),
   keyset-paginated on (finished_at, id). A succeeded diagnosis always has `finished_at`, the
   moment its report was written: history is ordered by when things were measured.
2. `report_digests`: for those rows only, the verdict and the two parts of each report the
   history shows (`layers` and `findings`), extracted by the database (`report -> 'layers'`
   on Postgres, `json_extract` on SQLite). The rest of a report (per-tensor `parameters`,
   profiles, recommendations with their snippets) never leaves the database.

Two steps rather than one query because Postgres would evaluate the JSON extraction for every
candidate row before the sort and the LIMIT (it is too cheap an expression to postpone), i.e.
detoast every report of the name; the second query touches at most one page of reports.
The first query reads no column stored after `report` either (hence no `verdict`): SQLite keeps
a row's columns in one record, and reaching one past a large report walks its overflow pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from service.db.models import Diagnosis, ModelRecord
from service.db.repositories.diagnoses import KIND_DIAGNOSE, Cursor

SUCCEEDED = "succeeded"


@dataclass(frozen=True)
class HistoryRow:
    diagnosis_id: str
    model_id: str
    model_version: int
    batch_id: str | None
    created_at: datetime
    finished_at: datetime

    @property
    def cursor(self) -> Cursor:
        """The position after this row (the API's one cursor shape; here on finished_at)."""
        return Cursor(created_at=self.finished_at, id=self.diagnosis_id)


@dataclass(frozen=True)
class ReportDigest:
    """The parts of one report the history needs (absent parts are empty lists)."""

    verdict: str | None
    layers: list[dict[str, Any]]
    findings: list[dict[str, Any]]


def history_rows(
    session: Session,
    tenant_id: str,
    name: str,
    *,
    batch_id: str | None = None,
    until: datetime | None = None,
    after: Cursor | None = None,
    limit: int,
) -> list[HistoryRow]:
    """Up to `limit` succeeded diagnoses of the tenant's models called `name` (every version),
    newest first by (finished_at, id), finished before `until`, strictly after the position
    `after` in that order."""
    finished_at = Diagnosis.finished_at
    query = (
        select(
            Diagnosis.id,
            Diagnosis.model_id,
            ModelRecord.version,
            Diagnosis.batch_id,
            Diagnosis.created_at,
            finished_at,
        )
        .join(ModelRecord, ModelRecord.id == Diagnosis.model_id)
        .where(
            ModelRecord.tenant_id == tenant_id,
            ModelRecord.name == name,
            Diagnosis.tenant_id == tenant_id,
            Diagnosis.kind == KIND_DIAGNOSE,
            Diagnosis.status == SUCCEEDED,
            finished_at.is_not(None),
        )
    )
    if batch_id is not None:
        query = query.where(Diagnosis.batch_id == batch_id)
    if until is not None:
        query = query.where(finished_at < until)
    if after is not None:
        query = query.where(
            or_(
                finished_at < after.created_at,
                and_(finished_at == after.created_at, Diagnosis.id < after.id),
            )
        )
    rows = session.execute(query.order_by(finished_at.desc(), Diagnosis.id.desc()).limit(limit))
    return [
        HistoryRow(
            diagnosis_id=row.id,
            model_id=row.model_id,
            model_version=row.version,
            batch_id=row.batch_id,
            created_at=row.created_at,
            finished_at=row.finished_at,
        )
        for row in rows
    ]


def report_digests(session: Session, diagnosis_ids: list[str]) -> dict[str, ReportDigest]:
    """diagnosis id → its verdict and the `layers` and `findings` of its report, extracted in
    the database."""
    if not diagnosis_ids:
        return {}
    report = Diagnosis.report
    rows = session.execute(
        select(Diagnosis.id, Diagnosis.verdict, report["layers"], report["findings"]).where(
            Diagnosis.id.in_(diagnosis_ids)
        )
    )
    return {
        row[0]: ReportDigest(
            verdict=row[1], layers=_list_of_dicts(row[2]), findings=_list_of_dicts(row[3])
        )
        for row in rows
    }


def _list_of_dicts(value: Any) -> list[dict[str, Any]]:
    # A report written by an older engine may lack a part; never fail the history over it.
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]
