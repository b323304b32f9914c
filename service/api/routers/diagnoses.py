"""Diagnoses: queue one (JSON, or one-shot multipart), read it, list them, cancel one."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.api.deps import (
    DatabaseDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    TenantDep,
    in_read_session,
)
from service.api.filters import distinct, merged_page
from service.api.operations import (
    BadOptionsError,
    build_options,
    cancel_diagnosis,
    create_batch,
    create_diagnosis,
    first_answer_for_key,
    get_diagnosis,
    model_name,
    reuse_or_create_model,
)
from service.api.pages.layout import page_headers
from service.api.pages.report_page import render_page
from service.api.pages.view import load_view
from service.api.presenters import diagnosis_out, diagnosis_summary
from service.api.routers.models import UPLOAD_ERRORS
from service.api.schemas import (
    DiagnosisCreate,
    DiagnosisOut,
    DiagnosisPage,
    DiagnosisStatus,
    ErrorResponse,
)
from service.api.uploads import MultipartForm, multipart_body, receive_form
from service.auth import CurrentTenant
from service.config import Settings
from service.db.models import Diagnosis
from service.db.repositories import diagnoses as diagnoses_repo
from service.db.session import Database
from service.errors import BadInputError
from service.storage import BlobStore
from service.storage.batch_listing import list_batch
from service.storage.sniff import sniff_model_format

router = APIRouter(prefix="/v1", tags=["diagnoses"])
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description="a repeated key returns the first answer instead of queueing again",
    ),
]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "no such diagnosis for this tenant"}
}
AUTH: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or unknown API key"}
}
OPTION_FIELDS = ("loss", "mode", "precision", "device")


def accepted(job: Diagnosis, response: Response) -> DiagnosisOut:
    response.headers["Location"] = f"/v1/diagnoses/{job.id}"
    return diagnosis_out(job)


@router.post(
    "/diagnoses",
    status_code=202,
    response_model=DiagnosisOut,
    summary="Queue a diagnosis of an uploaded model on an uploaded batch",
    responses={
        **AUTH,
        404: {"model": ErrorResponse, "description": "model or batch not found"},
        409: {"model": ErrorResponse, "description": "Idempotency-Key reused for another request"},
        422: {"model": ErrorResponse, "description": "invalid options"},
    },
)
def queue_diagnosis(
    body: DiagnosisCreate,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> DiagnosisOut:
    options = build_options(body.model_dump(include=set(OPTION_FIELDS)), body.options)
    with session.begin():
        job = create_diagnosis(
            session,
            tenant.id,
            model_id=body.model_id,
            batch_id=body.batch_id,
            options=options,
            max_attempts=settings.max_attempts,
            idempotency_key=idempotency_key,
        )
    return accepted(job, response)


def _run_options(form: MultipartForm) -> dict[str, Any]:
    raw = form.fields.get("options") or "{}"
    try:
        extra = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadOptionsError(f"the form field 'options' is not JSON ({exc.msg})") from exc
    if not isinstance(extra, dict):
        raise BadOptionsError("the form field 'options' must be a JSON object")
    return build_options({k: form.fields.get(k) or None for k in OPTION_FIELDS}, extra)


def store_and_queue(
    database: Database,
    store: BlobStore,
    settings: Settings,
    tenant: CurrentTenant,
    form: MultipartForm,
    idempotency_key: str | None,
) -> Diagnosis:
    options = _run_options(form)
    model_upload, batch_upload = form.files["model"], form.files["batch"]
    name = model_name(form.fields.get("name"), model_upload.filename)
    model_format = sniff_model_format(model_upload.path)
    listing = list_batch(batch_upload.path)
    batch_filename = batch_upload.filename
    model_blob = store.save(model_upload)
    batch_blob = store.save(batch_upload)
    with database.session() as session:
        model = reuse_or_create_model(
            session,
            tenant.id,
            name=name,
            blob=model_blob,
            format=model_format,
            max_attempts=settings.max_attempts,
        )
        batch = create_batch(
            session, tenant.id, blob=batch_blob, filename=batch_filename, listing=listing
        )
        job = create_diagnosis(
            session,
            tenant.id,
            model_id=model.id,
            batch_id=batch.id,
            options=options,
            max_attempts=settings.max_attempts,
            idempotency_key=idempotency_key,
        )
        session.commit()
        return job


def _existing_answer(database: Database, tenant_id: str, key: str | None) -> Diagnosis | None:
    with database.session(read_only=True) as session:
        return first_answer_for_key(session, tenant_id, key)


@router.post(
    "/diagnoses:run",
    status_code=202,
    response_model=DiagnosisOut,
    summary="One shot for pipelines: upload a model and a batch and queue their diagnosis",
    description="multipart `model` and `batch` files, plus optional text fields `name`, "
    "`loss`, `mode`, `precision`, `device` and `options` (a JSON object of other options). "
    "The latest version of `name` is reused when the model bytes are unchanged.",
    responses={**UPLOAD_ERRORS, 422: {"model": ErrorResponse, "description": "bad input"}},
    openapi_extra=multipart_body(
        {"model": "the model file", "batch": "the batch file"},
        {
            "name": {"type": "string", "example": "resnet-tiny"},
            "loss": {"type": "string", "example": "cross_entropy"},
            "mode": {"type": "string", "enum": ["train", "eval"]},
            "precision": {"type": "string", "enum": ["fp32", "bf16", "fp16"]},
            "device": {"type": "string", "example": "auto"},
            "options": {"type": "string", "example": '{"verify_fixes": true}'},
        },
    ),
)
async def run_diagnosis(
    request: Request,
    response: Response,
    tenant: TenantDep,
    settings: SettingsDep,
    database: DatabaseDep,
    store: StoreDep,
    idempotency_key: IdempotencyKey = None,
) -> DiagnosisOut:
    # A repeated key answers before the (possibly large) body is read.
    existing = await run_in_threadpool(_existing_answer, database, tenant.id, idempotency_key)
    if existing is not None:
        return accepted(existing, response)
    form = await receive_form(request, settings, files=("model", "batch"))
    try:
        job = await run_in_threadpool(
            store_and_queue, database, store, settings, tenant, form, idempotency_key
        )
    finally:
        form.discard()
    return accepted(job, response)


@router.get(
    "/diagnoses/{diagnosis_id}",
    response_model=DiagnosisOut,
    summary="A diagnosis: its status and, once succeeded, its report",
    responses={**AUTH, **NOT_FOUND},
)
async def read_diagnosis(
    diagnosis_id: str, tenant: TenantDep, database: DatabaseDep
) -> DiagnosisOut:
    return await in_read_session(
        database, lambda session: diagnosis_out(get_diagnosis(session, tenant.id, diagnosis_id))
    )


@router.get(
    "/diagnoses/{diagnosis_id}/report.html",
    response_class=HTMLResponse,
    summary="The diagnosis as a page with charts",
    description="A self-contained HTML page (inline CSS and SVG charts, no scripts, nothing "
    "fetched from the network): verdict, findings with their evidence, recommendations with "
    "code and verified before/after figures, the depth and time gradient profiles, layer and "
    "parameter tables. A queued or running diagnosis gets a page that reloads itself; a failed "
    "one shows its error. Same API key as every /v1 call.",
    responses={200: {"content": {"text/html": {}}}, **AUTH, **NOT_FOUND},
)
async def read_report_page(
    diagnosis_id: str, tenant: TenantDep, database: DatabaseDep
) -> HTMLResponse:
    view = await in_read_session(
        database, lambda session: load_view(session, tenant.id, diagnosis_id)
    )
    html = await run_in_threadpool(render_page, view)  # big reports take a while to draw
    return HTMLResponse(html, headers=page_headers(view.status))


@router.get(
    "/diagnoses",
    response_model=DiagnosisPage,
    summary="List diagnoses, newest first (reports left out: GET one for its report)",
    responses={**AUTH, 422: {"model": ErrorResponse, "description": "bad cursor or filter"}},
)
async def list_diagnoses(
    tenant: TenantDep,
    database: DatabaseDep,
    model_id: Annotated[
        list[str] | None, Query(description="only these models' diagnoses (repeat for several)")
    ] = None,
    status: Annotated[
        list[DiagnosisStatus] | None,
        Query(description="only diagnoses in one of these states (repeat for several)"),
    ] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> DiagnosisPage:
    try:
        after = diagnoses_repo.Cursor.decode(cursor) if cursor else None
    except ValueError as exc:
        raise BadInputError(f"{exc}; pass the next_cursor of a previous page") from exc

    def page(session: Session) -> DiagnosisPage:
        items, nxt = merged_page(
            lambda **one: diagnoses_repo.list_page(
                session, tenant.id, after=after, limit=limit, **one
            ),
            {"model_id": distinct(model_id), "status": distinct(status)},
            limit=limit,
            cursor_of=lambda job: diagnoses_repo.Cursor(created_at=job.created_at, id=job.id),
        )
        return DiagnosisPage(
            items=[diagnosis_summary(job) for job in items],
            next_cursor=nxt.encode() if nxt else None,
        )

    return await in_read_session(database, page)


@router.post(
    "/diagnoses/{diagnosis_id}:cancel",
    response_model=DiagnosisOut,
    summary="Cancel a diagnosis; a running one is stopped by its worker",
    responses={
        **AUTH,
        **NOT_FOUND,
        409: {"model": ErrorResponse, "description": "already succeeded or failed"},
    },
)
def cancel(diagnosis_id: str, tenant: TenantDep, session: SessionDep) -> DiagnosisOut:
    with session.begin():
        job = cancel_diagnosis(session, tenant.id, diagnosis_id)
    return diagnosis_out(job)
