"""POST /v1/models: upload a model (a new version of its name) and queue its inspection."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from service.api.deps import (
    DatabaseDep,
    SettingsDep,
    StoreDep,
    TenantDep,
    in_read_session,
)
from service.api.operations import create_model, get_model, model_name
from service.api.presenters import model_out
from service.api.schemas import ErrorResponse, ModelOut
from service.api.uploads import SpooledUpload, multipart_body, receive_form
from service.auth import CurrentTenant
from service.config import Settings
from service.db.session import Database
from service.storage import BlobStore
from service.storage.sniff import sniff_model_format

router = APIRouter(prefix="/v1/models", tags=["models"])
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or unknown API key"},
    413: {"model": ErrorResponse, "description": "larger than GRADHEALTH_MAX_UPLOAD_BYTES"},
    415: {"model": ErrorResponse, "description": "not multipart/form-data"},
    422: {"model": ErrorResponse, "description": "not a model in a supported format"},
}


def store_model(
    database: Database,
    store: BlobStore,
    settings: Settings,
    tenant: CurrentTenant,
    upload: SpooledUpload,
    name: str | None,
) -> ModelOut:
    chosen = model_name(name, upload.filename)
    model_format = sniff_model_format(upload.path)
    blob = store.save(upload)
    with database.session() as session:
        record = create_model(
            session,
            tenant.id,
            name=chosen,
            blob=blob,
            format=model_format,
            max_attempts=settings.max_attempts,
        )
        session.commit()
        return model_out(record)


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
    summary="Upload a model",
    description="multipart `file` (ONNX, TorchScript or torch.export .pt2; the format is read "
    "from the content) and an optional `name` (default: the file name without extension). "
    "Each upload under one name is a new version; the same bytes are stored once. `inputs`, "
    "`outputs` and `parameter_count` are filled by a worker's inspection job shortly after.",
    responses=UPLOAD_ERRORS,
    openapi_extra=multipart_body(
        {"file": "the model file"},
        {"name": {"type": "string", "description": "model name", "example": "resnet-tiny"}},
    ),
)
async def upload_model(
    request: Request,
    tenant: TenantDep,
    settings: SettingsDep,
    database: DatabaseDep,
    store: StoreDep,
) -> ModelOut:
    form = await receive_form(request, settings, files=("file",))
    try:
        return await run_in_threadpool(
            store_model,
            database,
            store,
            settings,
            tenant,
            form.files["file"],
            form.fields.get("name"),
        )
    finally:
        form.discard()


@router.get(
    "/{model_id}",
    response_model=ModelOut,
    summary="Get a model",
    responses={404: {"model": ErrorResponse, "description": "no such model for this tenant"}},
)
async def read_model(model_id: str, tenant: TenantDep, database: DatabaseDep) -> ModelOut:
    return await in_read_session(
        database, lambda session: model_out(get_model(session, tenant.id, model_id))
    )
