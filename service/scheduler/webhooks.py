"""Webhooks of scheduled diagnoses: when one succeeds or fails, POST
`{schedule_id, diagnosis_id, status, verdict, report_url}` to the schedule's webhook URL.

Delivered by the scheduler loop, never by a worker: a slow or dead receiver must not hold up
or crash a diagnosis. Each attempt is claimed before it is made, by a conditional UPDATE that
bumps `webhook_attempts` and pushes `webhook_next_at` past the attempt's timeout; a
concurrent scheduler that read the same row updates nothing and sends nothing. So a receiver
gets at most `MAX_WEBHOOK_ATTEMPTS` POSTs per run (one in the normal case), spaced by a
growing backoff; then the run is marked `failed` with the last error. No transaction is held
open while a request is in flight.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from service.db.models import Diagnosis, ScheduleRun
from service.db.session import Database
from service.scheduler.due import WEBHOOK_PENDING

log = logging.getLogger("gradhealth.scheduler.webhooks")

WEBHOOK_TIMEOUT_S = 5.0
MAX_WEBHOOK_ATTEMPTS = 3
WEBHOOK_BACKOFF_S = 30.0  # before attempt 2; doubled after each failure
DELIVERY_BATCH = 20
WEBHOOK_DELIVERED = "delivered"
WEBHOOK_FAILED = "failed"
NOTIFIED_STATUSES = ("succeeded", "failed")
MAX_ERROR_LENGTH = 500


@dataclass(frozen=True)
class Delivery:
    run_id: str
    url: str
    attempt: int
    payload: dict[str, Any]


def deliver_webhooks(
    database: Database,
    now: datetime,
    *,
    public_url: str = "",
    timeout_s: float = WEBHOOK_TIMEOUT_S,
) -> list[tuple[str, bool]]:
    """Send the webhooks whose diagnosis has finished; returns (run id, delivered) for every
    attempt this call made. `public_url`: the API's address as receivers reach it, put in
    front of `report_url` (a path alone when empty)."""
    with database.session() as session:
        deliveries = _claim_attempts(session, now, public_url, timeout_s)
        session.commit()
    outcomes = []
    for delivery in deliveries:
        error = post_json(delivery.url, delivery.payload, timeout_s)
        with database.session() as session:
            _record(session, delivery, error, now)
            session.commit()
        outcomes.append((delivery.run_id, error is None))
    return outcomes


def _claim_attempts(
    session: Session, now: datetime, public_url: str, timeout_s: float
) -> list[Delivery]:
    rows = session.execute(
        select(ScheduleRun, Diagnosis.status, Diagnosis.verdict)
        .join(Diagnosis, Diagnosis.id == ScheduleRun.diagnosis_id)
        .where(
            ScheduleRun.webhook_state == WEBHOOK_PENDING,
            or_(ScheduleRun.webhook_next_at.is_(None), ScheduleRun.webhook_next_at <= now),
            Diagnosis.status.in_(NOTIFIED_STATUSES),
        )
        .limit(DELIVERY_BATCH)
    ).all()
    deliveries = []
    for run, status, verdict in rows:
        # Past the attempt's timeout: a scheduler that died mid-attempt is retried later.
        claimed = session.execute(
            update(ScheduleRun)
            .where(
                ScheduleRun.id == run.id,
                ScheduleRun.webhook_attempts == run.webhook_attempts,
                ScheduleRun.webhook_state == WEBHOOK_PENDING,
            )
            .values(
                webhook_attempts=run.webhook_attempts + 1,
                webhook_next_at=now + timedelta(seconds=timeout_s + _backoff(run.webhook_attempts)),
            )
            .execution_options(synchronize_session=False)
        )
        if claimed.rowcount != 1 or run.webhook_url is None:  # type: ignore[attr-defined]
            continue
        deliveries.append(
            Delivery(
                run_id=run.id,
                url=run.webhook_url,
                attempt=run.webhook_attempts + 1,
                payload={
                    "schedule_id": run.schedule_id,
                    "diagnosis_id": run.diagnosis_id,
                    "status": status,
                    "verdict": verdict,
                    "report_url": f"{public_url.rstrip('/')}/v1/diagnoses/"
                    f"{run.diagnosis_id}/report.html",
                },
            )
        )
    return deliveries


def _backoff(attempts_made: int) -> float:
    return WEBHOOK_BACKOFF_S * 2.0 ** max(attempts_made - 1, 0) if attempts_made else 0.0


def _record(session: Session, delivery: Delivery, error: str | None, now: datetime) -> None:
    values: dict[str, Any]
    if error is None:
        values = {"webhook_state": WEBHOOK_DELIVERED, "webhook_delivered_at": now}
    else:
        log.warning("webhook %s attempt %d failed: %s", delivery.url, delivery.attempt, error)
        values = {"webhook_error": error[:MAX_ERROR_LENGTH]}
        if delivery.attempt >= MAX_WEBHOOK_ATTEMPTS:
            values["webhook_state"] = WEBHOOK_FAILED
        else:
            retry_at = now + timedelta(seconds=_backoff(delivery.attempt))
            values["webhook_next_at"] = retry_at
    session.execute(
        update(ScheduleRun)
        .where(ScheduleRun.id == delivery.run_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def post_json(url: str, payload: dict[str, Any], timeout_s: float) -> str | None:
    """POST `payload` as JSON; None when the receiver answered 2xx, else why not."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "gradhealth-webhook"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        return f"the receiver answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"cannot reach the receiver: {exc}"
    return None if 200 <= status < 300 else f"the receiver answered HTTP {status}"
