"""POST /v1/batches: upload a sample batch; its arrays are listed from the file's headers.
GET: list them or read one."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.api.deps import (
    DatabaseDep,
    SettingsDep,
    StoreDep,
    TenantDep,
    in_read_session,
)
from service.api.operations import create_batch, get_batch
from service.api.presenters import batch_out
from service.api.routers.models import (
    LIST_ERRORS,
    UPLOAD_ERRORS,
    CursorQuery,
    LimitQuery,
    parse_cursor,
)
from service.api.schemas import BatchOut, BatchPage, ErrorResponse
from service.api.uploads import SpooledUpload, multipart_body, receive_form
from service.auth import CurrentTenant
from service.db.repositories import batches as batches_repo
from service.db.session import Database
from service.storage import BlobStore
from service.storage.batch_listing import list_batch

router = APIRouter(prefix="/v1/batches", tags=["batches"])


def store_batch(
    database: Database, store: BlobStore, tenant: CurrentTenant, upload: SpooledUpload
) -> BatchOut:
    listing = list_batch(upload.path)
    filename = upload.filename
    blob = store.save(upload)
    with database.session() as session:
        record = create_batch(session, tenant.id, blob=blob, filename=filename, listing=listing)
        session.commit()
        return batch_out(record)


@router.post(
    "",
    status_code=201,
    response_model=BatchOut,
    summary="Upload a sample batch",
    description="multipart `file`: `.npz` (no pickled objects), `.safetensors`, or a `.pt` "
    "written by torch.save holding a dict of tensors. Arrays named like the model's inputs "
    "feed them; `target` (or `targets`, `labels`, `y`) is the loss target.",
    responses={**UPLOAD_ERRORS, 422: {"model": ErrorResponse, "description": "not a batch"}},
    openapi_extra=multipart_body({"file": "the batch file"}),
)
async def upload_batch(
    request: Request,
    tenant: TenantDep,
    settings: SettingsDep,
    database: DatabaseDep,
    store: StoreDep,
) -> BatchOut:
    form = await receive_form(request, settings, files=("file",))
    try:
        return await run_in_threadpool(store_batch, database, store, tenant, form.files["file"])
    finally:
        form.discard()


@router.get(
    "",
    response_model=BatchPage,
    summary="List batches, newest first",
    responses=LIST_ERRORS,
)
async def list_batches(
    tenant: TenantDep, database: DatabaseDep, cursor: CursorQuery = None, limit: LimitQuery = 50
) -> BatchPage:
    after = parse_cursor(cursor)

    def page(session: Session) -> BatchPage:
        items, nxt = batches_repo.list_page(session, tenant.id, after=after, limit=limit)
        return BatchPage(
            items=[batch_out(record) for record in items],
            next_cursor=nxt.encode() if nxt else None,
        )

    return await in_read_session(database, page)


@router.get(
    "/{batch_id}",
    response_model=BatchOut,
    summary="Get a batch",
    responses={404: {"model": ErrorResponse, "description": "no such batch for this tenant"}},
)
async def read_batch(batch_id: str, tenant: TenantDep, database: DatabaseDep) -> BatchOut:
    return await in_read_session(
        database, lambda session: batch_out(get_batch(session, tenant.id, batch_id))
    )
