"""Create, change and read schedules for the API. Like `service.api.operations`: takes a
session and a tenant id, never commits, and answers 404 for another tenant's rows.

A schedule names its model by NAME: each run diagnoses the latest version of that name at run
time (`service.scheduler.due`). Creating or renaming requires that some version exists now,
so that a typo answers 404 at once instead of failing every night.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from service.api.operations import build_options, get_batch
from service.db.models import Schedule, utcnow
from service.db.repositories import models as models_repo
from service.db.repositories import schedules as schedules_repo
from service.errors import NotFoundError
from service.scheduler.cron import BadScheduleError, next_tick, parse_timezone, validate_cron

MAX_URL_LENGTH = 2000
MAX_NAME_LENGTH = 200


def validate_webhook_url(url: str | None) -> str | None:
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadScheduleError(
            f"webhook_url: {url!r} is not an http(s) URL; give one like "
            "'https://ci.example.com/hooks/gradhealth', or null for no webhook"
        )
    if len(url) > MAX_URL_LENGTH:
        raise BadScheduleError(f"webhook_url: longer than {MAX_URL_LENGTH} characters")
    return url


def require_model_name(session: Session, tenant_id: str, name: str) -> str:
    if not name.strip() or len(name) > MAX_NAME_LENGTH:
        raise BadScheduleError(f"model_name: give the name of an uploaded model (got {name!r})")
    if models_repo.latest_version(session, tenant_id, name) is None:
        raise NotFoundError(
            f"no model named {name!r} for this API key's tenant; upload one with "
            "POST /v1/models (field `name`) first"
        )
    return name


def get_schedule(session: Session, tenant_id: str, schedule_id: str) -> Schedule:
    schedule = schedules_repo.get(session, tenant_id, schedule_id)
    if schedule is None:
        raise NotFoundError(f"no schedule with id {schedule_id!r} for this API key's tenant")
    return schedule


def create_schedule(
    session: Session,
    tenant_id: str,
    *,
    model_name: str,
    batch_id: str,
    cron: str,
    timezone: str,
    enabled: bool,
    webhook_url: str | None,
    options: dict[str, Any],
    now: datetime | None = None,
) -> Schedule:
    """`options`: already merged and validated (`build_options`)."""
    cron = validate_cron(cron)
    parse_timezone(timezone)
    webhook_url = validate_webhook_url(webhook_url)
    require_model_name(session, tenant_id, model_name)
    get_batch(session, tenant_id, batch_id)
    now = now or utcnow()
    return schedules_repo.add(
        session,
        Schedule(
            tenant_id=tenant_id,
            model_name=model_name,
            batch_id=batch_id,
            options=options,
            cron=cron,
            timezone=timezone,
            enabled=enabled,
            webhook_url=webhook_url,
            next_run_at=next_tick(cron, timezone, now),
            created_at=now,
            updated_at=now,
        ),
    )


OPTION_FIELDS = ("loss", "mode", "precision", "device")


def update_schedule(
    session: Session,
    tenant_id: str,
    schedule_id: str,
    changes: dict[str, Any],
    now: datetime | None = None,
) -> Schedule:
    """Apply `changes` (only the fields the client sent). The next tick is computed again when
    the cron expression or time zone changes, and when the schedule is enabled again (so that
    it does not fire at once for a tick that passed while it was off)."""
    schedule = get_schedule(session, tenant_id, schedule_id)
    now = now or utcnow()
    retime = False
    if "cron" in changes:
        schedule.cron = validate_cron(_required(changes, "cron"))
        retime = True
    if "timezone" in changes:
        schedule.timezone = _required(changes, "timezone")
        parse_timezone(schedule.timezone)
        retime = True
    if "enabled" in changes:
        enabled = bool(_required(changes, "enabled"))
        retime = retime or (enabled and not schedule.enabled)
        schedule.enabled = enabled
    if "webhook_url" in changes:
        schedule.webhook_url = validate_webhook_url(changes["webhook_url"])
    if "model_name" in changes:
        schedule.model_name = require_model_name(
            session, tenant_id, _required(changes, "model_name")
        )
    if "batch_id" in changes:
        schedule.batch_id = get_batch(session, tenant_id, _required(changes, "batch_id")).id
    if any(field in changes for field in (*OPTION_FIELDS, "options")):
        extra = {**schedule.options, **(changes.get("options") or {})}
        schedule.options = build_options({k: changes.get(k) for k in OPTION_FIELDS}, extra)
    if retime:
        schedule.next_run_at = next_tick(schedule.cron, schedule.timezone, now)
    schedule.updated_at = now
    session.flush()
    return schedule


def _required(changes: dict[str, Any], field: str) -> Any:
    value = changes[field]
    if value is None:
        raise BadScheduleError(f"{field}: cannot be null; leave it out to keep the current value")
    return value
