"""Liveness, readiness and Prometheus metrics (no API key: probes and scrapers call these)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from service.api.deps import DatabaseDep
from service.api.schemas import Health, Readiness
from service.db.migrate import current_revision, head_revision

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: the database answers and its migrations are at head",
    responses={503: {"model": Readiness, "description": "not ready (see the fields)"}},
)
def readyz(database: DatabaseDep) -> Response:
    head = head_revision()
    try:
        with database.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            revision = current_revision(conn)
    except Exception as exc:
        body = Readiness(
            status="not_ready",
            database=f"unreachable: {type(exc).__name__}",
            revision=None,
            head=head,
        )
        return JSONResponse(body.model_dump(), status_code=503)
    ready = revision == head
    body = Readiness(
        status="ready" if ready else "not_ready",
        database="ok" if ready else "migrations pending: run `gradhealth migrate`",
        revision=revision,
        head=head,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"example": "gradhealth_jobs{...} 3"}}}},
)
def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
