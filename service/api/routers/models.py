"""POST /v1/models: upload a model (a new version of its name) and queue its inspection;
GET: list them, read one, or read its name's history of diagnoses."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.api.deps import (
    DatabaseDep,
    SettingsDep,
    StoreDep,
    TenantDep,
    in_read_session,
)
from service.api.history import (
    LAYER_CHANGE_FACTOR,
    model_history,
    parse_layer_view,
    parse_timestamp,
)
from service.api.operations import create_model, get_model, model_name
from service.api.presenters import model_out
from service.api.schemas import ErrorResponse, ModelHistory, ModelOut, ModelPage
from service.api.uploads import SpooledUpload, multipart_body, receive_form
from service.auth import CurrentTenant
from service.config import Settings
from service.db.repositories import models as models_repo
from service.db.repositories.diagnoses import Cursor
from service.db.session import Database
from service.errors import BadInputError
from service.storage import BlobStore
from service.storage.sniff import sniff_model_format

router = APIRouter(prefix="/v1/models", tags=["models"])
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or unknown API key"},
    413: {"model": ErrorResponse, "description": "larger than GRADHEALTH_MAX_UPLOAD_BYTES"},
    415: {"model": ErrorResponse, "description": "not multipart/form-data"},
    422: {"model": ErrorResponse, "description": "not a model in a supported format"},
}
LIST_ERRORS: dict[int | str, dict[str, Any]] = {
    401: UPLOAD_ERRORS[401],
    422: {"model": ErrorResponse, "description": "bad cursor or limit"},
}
CursorQuery = Annotated[str | None, Query(description="next_cursor of the previous page")]
LimitQuery = Annotated[int, Query(ge=1, le=200)]


def parse_cursor(cursor: str | None) -> Cursor | None:
    """The position a list request resumes after; 422 naming the fix for a foreign string."""
    try:
        return Cursor.decode(cursor) if cursor else None
    except ValueError as exc:
        raise BadInputError(f"{exc}; pass the next_cursor of a previous page") from exc


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
    "",
    response_model=ModelPage,
    summary="List models, newest first (every version; `name` keeps one name's versions)",
    responses=LIST_ERRORS,
)
async def list_models(
    tenant: TenantDep,
    database: DatabaseDep,
    name: Annotated[str | None, Query(description="exact model name: all its versions")] = None,
    cursor: CursorQuery = None,
    limit: LimitQuery = 50,
) -> ModelPage:
    after = parse_cursor(cursor)

    def page(session: Session) -> ModelPage:
        items, nxt = models_repo.list_page(session, tenant.id, name=name, after=after, limit=limit)
        return ModelPage(
            items=[model_out(record) for record in items],
            next_cursor=nxt.encode() if nxt else None,
        )

    return await in_read_session(database, page)


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


@router.get(
    "/{model_id}/history",
    response_model=ModelHistory,
    summary="Diagnoses of this model's name over time, with per-layer changes",
    description="The succeeded diagnoses of every version of the model's name, newest first "
    "(by `finished_at`), each with its verdict, finding counts and kinds, and per layer the "
    "gradient norms and dead/saturated fractions. `changes` compares each entry with the next "
    "older one of the same list (whatever `since`/`until` and the page cut off; pass `batch_id` "
    "to compare like with like): findings that appeared or were resolved, layers added or "
    "removed between versions, and per shared layer the ratio now/before of the gradient norms, "
    f"`flagged` at ×{LAYER_CHANGE_FACTOR:g} or ÷{LAYER_CHANGE_FACTOR:g} (`change_factor`).",
    responses={
        **LIST_ERRORS,
        404: {"model": ErrorResponse, "description": "no such model for this tenant"},
        422: {"model": ErrorResponse, "description": "bad cursor, limit, since or until"},
    },
)
async def read_model_history(
    model_id: str,
    tenant: TenantDep,
    database: DatabaseDep,
    since: Annotated[
        str | None,
        Query(description="ISO 8601: diagnoses finished at or after this time (UTC if no offset)"),
    ] = None,
    until: Annotated[
        str | None, Query(description="ISO 8601: diagnoses finished before this time")
    ] = None,
    batch_id: Annotated[
        str | None, Query(description="only diagnoses on this batch (like-for-like changes)")
    ] = None,
    cursor: CursorQuery = None,
    limit: LimitQuery = 50,
    layers: Annotated[
        str,
        Query(
            description="per-layer parts of each entry: `all`; `flagged`, only the layers "
            "flagged or added since the older entry (in `layers` and `changes.layers`); `none`, "
            "no per-layer figures (a page's size no longer grows with the layer count; "
            "`changes` still names the flagged, added and removed layers)"
        ),
    ] = "all",
) -> Response:
    after = parse_cursor(cursor)
    window = parse_timestamp(since, "since"), parse_timestamp(until, "until")
    layer_view = parse_layer_view(layers)

    def page(session: Session) -> bytes:
        history = model_history(
            session,
            tenant.id,
            model_id,
            since=window[0],
            until=window[1],
            batch_id=batch_id,
            after=after,
            limit=limit,
            layers=layer_view,
        )
        return history.model_dump_json().encode()

    # A page can hold thousands of per-layer figures: the body, built and validated once as a
    # ModelHistory, is serialised here in the worker thread. Returning the model instead would
    # make FastAPI dump, validate and serialise it again in the event loop (about as long as
    # building it).
    body = await in_read_session(database, page)
    return Response(content=body, media_type="application/json")
