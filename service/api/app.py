"""The FastAPI application: `create_app(settings) -> FastAPI`.

The app never creates tables (migrations do: `gradhealth migrate`) and never imports torch.
Pass `database` to share an engine (tests, `gradhealth serve`); otherwise the app builds one
from `settings` and disposes of it at shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

import service
from service.api.deps import AuthCache
from service.api.docs import install_docs
from service.api.errors import install_error_handlers
from service.api.filters import reject_repeated_query
from service.api.metrics import Metrics, MetricsMiddleware
from service.api.routers import batches, diagnoses, health, models, schedules
from service.config import Settings, get_settings
from service.db.session import Database
from service.storage import BlobStore

DESCRIPTION = """
Find where gradients vanish or explode, and how to fix it.

1. **Authorize** (button on the right) with an API key: `gradhealth keys create --tenant NAME`,
   or the key `gradhealth serve` printed on first start.
2. `POST /v1/models` a model (ONNX, TorchScript, torch.export `.pt2`) and `POST /v1/batches` a
   sample batch (`.npz`, `.safetensors`, `.pt`), then `POST /v1/diagnoses` with their ids —
   or do all three at once with `POST /v1/diagnoses:run`.
3. Poll `GET /v1/diagnoses/{id}` until `status` is `succeeded`: the report is in `report`.
4. For a recurring check, `POST /v1/schedules` (cron expression, time zone, model name, batch,
   optional webhook).

Errors are `{"error": {"code", "message"}}`; a 4xx is something the request can change.
"""


def create_app(settings: Settings | None = None, *, database: Database | None = None) -> FastAPI:
    settings = settings or get_settings()
    owns_database = database is None
    db = database or Database.from_settings(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if owns_database:
                db.dispose()

    app = FastAPI(
        title="gradhealth",
        version=getattr(service, "__version__", "0.1.0"),
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(reject_repeated_query)],  # service/api/filters.py
        docs_url=None,  # served from installed files, not a CDN: service/api/docs.py
        redoc_url=None,
    )
    install_docs(app)
    app.state.settings = settings
    app.state.database = db
    app.state.blob_store = BlobStore(settings, db)
    app.state.metrics = Metrics(db)
    app.state.auth_cache = AuthCache(settings.auth_cache_ttl_s)
    install_error_handlers(app)
    for router in (
        health.router,
        models.router,
        batches.router,
        diagnoses.router,
        schedules.router,
    ):
        app.include_router(router)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app
