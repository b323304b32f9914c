"""/v1/schedules: recurring health checks. Each tick of a schedule's cron expression (in its
time zone) queues a diagnosis of the latest version of its model name on its batch; a webhook
is told when that diagnosis finishes (service.scheduler)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from sqlalchemy.orm import Session

from service.api.deps import DatabaseDep, SessionDep, TenantDep, in_read_session
from service.api.operations import build_options
from service.api.routers.models import LIST_ERRORS, CursorQuery, LimitQuery, parse_cursor
from service.api.schemas import (
    ErrorResponse,
    ScheduleCreate,
    ScheduleOut,
    SchedulePage,
    ScheduleUpdate,
)
from service.db.models import Schedule
from service.db.repositories import schedules as schedules_repo
from service.scheduler.manage import (
    OPTION_FIELDS,
    create_schedule,
    get_schedule,
    update_schedule,
)

router = APIRouter(prefix="/v1/schedules", tags=["schedules"])
AUTH: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or unknown API key"}
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "no such schedule for this tenant"}
}
INVALID: dict[int | str, dict[str, Any]] = {
    422: {
        "model": ErrorResponse,
        "description": "bad cron expression, time zone, webhook URL or options (the message "
        "names the field)",
    }
}


def schedule_out(schedule: Schedule) -> ScheduleOut:
    return ScheduleOut(
        id=schedule.id,
        model_name=schedule.model_name,
        batch_id=schedule.batch_id,
        options=schedule.options,
        cron=schedule.cron,
        timezone=schedule.timezone,
        enabled=schedule.enabled,
        webhook_url=schedule.webhook_url,
        next_run_at=schedule.next_run_at,
        last_run_at=schedule.last_run_at,
        last_diagnosis_id=schedule.last_diagnosis_id,
        last_error=schedule.last_error,
        created_at=schedule.created_at,
        updated_at=schedule.updated_at,
    )


@router.post(
    "",
    status_code=201,
    response_model=ScheduleOut,
    summary="Create a recurring health check",
    description="Every tick of `cron` (5 fields, read in `timezone`, DST-correct) queues a "
    "diagnosis of the LATEST version of `model_name` on `batch_id`, with the same options as "
    "POST /v1/diagnoses. Ticks missed while nothing ran are skipped, not replayed.",
    responses={
        **AUTH,
        404: {"model": ErrorResponse, "description": "no model of that name, or no such batch"},
        **INVALID,
    },
)
def create(
    body: ScheduleCreate, tenant: TenantDep, session: SessionDep, response: Response
) -> ScheduleOut:
    options = build_options(body.model_dump(include=set(OPTION_FIELDS)), body.options)
    with session.begin():
        schedule = create_schedule(
            session,
            tenant.id,
            model_name=body.model_name,
            batch_id=body.batch_id,
            cron=body.cron,
            timezone=body.timezone,
            enabled=body.enabled,
            webhook_url=body.webhook_url,
            options=options,
        )
        response.headers["Location"] = f"/v1/schedules/{schedule.id}"
        return schedule_out(schedule)


@router.get(
    "",
    response_model=SchedulePage,
    summary="List schedules, newest first",
    responses=LIST_ERRORS,
)
async def list_schedules(
    tenant: TenantDep, database: DatabaseDep, cursor: CursorQuery = None, limit: LimitQuery = 50
) -> SchedulePage:
    after = parse_cursor(cursor)

    def page(session: Session) -> SchedulePage:
        items, nxt = schedules_repo.list_page(session, tenant.id, after=after, limit=limit)
        return SchedulePage(
            items=[schedule_out(s) for s in items], next_cursor=nxt.encode() if nxt else None
        )

    return await in_read_session(database, page)


@router.get(
    "/{schedule_id}",
    response_model=ScheduleOut,
    summary="A schedule, with its next and last run",
    responses={**AUTH, **NOT_FOUND},
)
async def read(schedule_id: str, tenant: TenantDep, database: DatabaseDep) -> ScheduleOut:
    return await in_read_session(
        database, lambda session: schedule_out(get_schedule(session, tenant.id, schedule_id))
    )


@router.patch(
    "/{schedule_id}",
    response_model=ScheduleOut,
    summary="Change some fields of a schedule",
    description="Only the fields sent change (`webhook_url: null` removes the webhook). "
    "`next_run_at` is computed again when `cron` or `timezone` change or the schedule is "
    "enabled again.",
    responses={
        **AUTH,
        404: {"model": ErrorResponse, "description": "no such schedule, model name or batch"},
        **INVALID,
    },
)
def patch(
    schedule_id: str, body: ScheduleUpdate, tenant: TenantDep, session: SessionDep
) -> ScheduleOut:
    changes = body.model_dump(include=body.model_fields_set)
    with session.begin():
        return schedule_out(update_schedule(session, tenant.id, schedule_id, changes))


@router.delete(
    "/{schedule_id}",
    status_code=204,
    summary="Delete a schedule (the diagnoses it queued stay)",
    responses={**AUTH, **NOT_FOUND},
)
def delete(schedule_id: str, tenant: TenantDep, session: SessionDep) -> Response:
    with session.begin():
        schedules_repo.delete(session, get_schedule(session, tenant.id, schedule_id))
    return Response(status_code=204)
