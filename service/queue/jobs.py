"""The job queue: state changes of rows in the `diagnoses` table.

A row is a job. Its life: `queued` → (claim) `running` → `succeeded` | `failed` | `cancelled`,
and back to `queued` when its worker dies (crash, expired lease) while attempts remain.

Every function takes a SQLAlchemy `Session` and never commits: the caller's transaction is the
boundary (house style). `enqueue` therefore happens in the same transaction as the row it
queues, and its Postgres `NOTIFY` is delivered only when that transaction commits (SQLite
workers poll). Client side: `enqueue`, `request_cancel`; worker side: the rest.

Cancellation: `request_cancel` cancels a queued job at once and flags a running one
(`cancel_requested`); the worker holding it sees the flag at its next check (`heartbeat`,
`cancelled_among`), stops the job and calls `finish_cancelled`. A result that arrives after
the flag is dropped.

Concurrency. `claim` is ONE statement, `UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED
LIMIT 1) AND status = 'queued' RETURNING …`: on Postgres, concurrent claimers skip each
other's locked rows; on SQLite (no row locks) the same statement takes the database's write
lock at once, so claimers are serialised by the database and the `status = 'queued'` recheck
makes a lost race claim nothing. `claim` must be the first statement of its transaction (a
SQLite transaction that read first cannot upgrade to a writer once another writer committed).

Time. On Postgres, leases and retry backoffs are computed with the database clock (`now()`),
so worker machines with skewed clocks still agree; SQLite is one machine, and uses the Python
clock.

Idempotency. A stalled job is run again, so a result can arrive twice (the first worker was
only slow). `complete` accepts a result for a job that is `queued` or `running` whoever holds
it, and ignores one for a job that is already finished: the report is a function of the job's
inputs, so writing it twice is harmless, and a cancelled job stays cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, select, text, true, update
from sqlalchemy.orm import Session

from service.db.models import BatchRecord, Diagnosis, ModelRecord, utcnow

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
FINISHED_STATUSES = frozenset({SUCCEEDED, FAILED, CANCELLED})

# Idle Postgres workers LISTEN on this channel; the payload is the job id.
QUEUE_CHANNEL = "gradhealth_jobs"

KIND_DIAGNOSE = "diagnose"
KIND_INSPECT = "inspect"


# A job whose worker died is retried after RETRY_BACKOFF_S * 2**(attempts-1), capped: a crash
# caused by the machine (OOM killer, preemption) is likelier to pass after a pause.
RETRY_BACKOFF_S = 1.0
MAX_RETRY_BACKOFF_S = 60.0

# A job asking for `device: cuda` waits this long for a GPU worker; then a CPU worker takes it
# and fails it saying so (no GPU worker may ever come: `gradhealth serve` on a laptop).
CUDA_WAIT_S = 300.0

# Error codes written by the queue and the workers (beside the engine's GradhealthError codes).
ERROR_LEASE_EXPIRED = "lease_expired"
ERROR_WORKER_CRASHED = "worker_crashed"
ERROR_TIMEOUT = "timeout"
ERROR_INTERNAL = "internal_error"


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to run a claimed job (the blobs are fetched by sha256)."""

    id: str
    tenant_id: str
    kind: str
    model_id: str
    batch_id: str | None
    options: dict[str, Any]
    attempts: int
    max_attempts: int
    model_sha256: str
    batch_sha256: str | None


@dataclass(frozen=True)
class HeartbeatResult:
    """`renewed`: jobs whose lease was extended. `stop`: jobs to stop now (cancelled). A job in
    neither was requeued by another worker's reaper while this one was slow: finishing it is
    harmless (`complete` is idempotent)."""

    renewed: frozenset[str]
    stop: frozenset[str]


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _now(session: Session) -> datetime | ColumnElement[datetime]:
    """The clock leases are measured with: the database's on Postgres, Python's on SQLite."""
    return func.now() if is_postgres(session) else utcnow()


def _clock_now(session: Session) -> datetime:
    """`_now` as a value, for rows changed through the ORM (one query on Postgres)."""
    if is_postgres(session):
        return session.execute(select(func.now())).scalar_one()
    return utcnow()


def notify_workers(session: Session, job_id: str) -> None:
    """Wake idle Postgres workers when the caller's transaction commits (no-op on SQLite)."""
    if is_postgres(session):
        session.execute(
            text("SELECT pg_notify(:channel, :job_id)"),
            {"channel": QUEUE_CHANNEL, "job_id": job_id},
        )


def enqueue(
    session: Session,
    tenant_id: str,
    *,
    kind: str,
    model_id: str,
    batch_id: str | None,
    options: dict[str, Any],
    max_attempts: int,
    idempotency_key: str | None = None,
) -> Diagnosis:
    """Insert a queued job in the caller's transaction (the API's POST /v1/diagnoses, the
    inspection of an upload, the scheduler)."""
    job = Diagnosis(
        tenant_id=tenant_id,
        kind=kind,
        model_id=model_id,
        batch_id=batch_id,
        options=options,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
        status=QUEUED,
        attempts=0,
        available_at=utcnow(),
    )
    session.add(job)
    session.flush()
    notify_workers(session, job.id)
    return job


def enqueue_inspection(session: Session, model: ModelRecord, *, max_attempts: int) -> Diagnosis:
    """Queue the worker-side inspection that fills `model.format/inputs/outputs/
    parameter_count` (the API never parses uploaded models)."""
    return enqueue(
        session,
        model.tenant_id,
        kind=KIND_INSPECT,
        model_id=model.id,
        batch_id=None,
        options={},
        max_attempts=max_attempts,
    )


def request_cancel(session: Session, job: Diagnosis) -> Diagnosis:
    """The API's `:cancel`. A queued job is cancelled at once; a running one is flagged
    (`cancel_requested`) and its worker stops it within `CANCEL_CHECK_INTERVAL_S` (see
    service/workers). Conditional UPDATEs, so a worker claiming the row at the same moment
    either finds it cancelled or gets the flag. A finished job is left as it is. Returns the
    row as it is now."""
    queued_cancelled = session.execute(
        update(Diagnosis)
        .where(Diagnosis.id == job.id, Diagnosis.status == QUEUED)
        .values(
            status=CANCELLED,
            cancel_requested=True,
            finished_at=utcnow(),
            error_code="cancelled",
            error_message="cancelled by the client before it started",
        )
        .returning(Diagnosis.id)
        .execution_options(synchronize_session=False)
    ).first()
    if queued_cancelled is None:
        session.execute(
            update(Diagnosis)
            .where(Diagnosis.id == job.id, Diagnosis.status.not_in(FINISHED_STATUSES))
            .values(cancel_requested=True)
            .execution_options(synchronize_session=False)
        )
    session.refresh(job)
    return job


def needs_cuda() -> ColumnElement[bool]:
    """The job's options ask for a CUDA device (`cuda`, `cuda:N`); `auto`, `cpu` or nothing
    runs anywhere. Read from the JSON options on both databases (`->>` / JSON_EXTRACT)."""
    device = func.lower(func.trim(func.coalesce(Diagnosis.options["device"].as_string(), "")))
    return device.like("cuda%")


def _runnable(session: Session, cuda: bool, cuda_wait_s: float) -> ColumnElement[bool]:
    """What a worker may claim. One without CUDA skips jobs that ask for it, until such a job
    has waited `cuda_wait_s` for a GPU worker: then it takes it, to fail it with a message that
    says so, rather than leave it queued forever where no GPU worker runs."""
    if cuda:
        return true()
    waited_until = _now(session) - timedelta(seconds=cuda_wait_s)
    return ~needs_cuda() | (Diagnosis.available_at <= waited_until)


def has_available(session: Session, *, cuda: bool = True, cuda_wait_s: float = CUDA_WAIT_S) -> bool:
    """A cheap read before `claim`: an idle worker polls with this, and claims (a write) only
    when there is something to take (that it can run: see `claim`)."""
    found = session.execute(
        select(Diagnosis.id)
        .where(Diagnosis.status == QUEUED, Diagnosis.available_at <= _now(session))
        .where(_runnable(session, cuda, cuda_wait_s))
        .limit(1)
    ).first()
    return found is not None


def claim(
    session: Session,
    worker_id: str,
    *,
    lease_s: float,
    kinds: tuple[str, ...] | None = None,
    cuda: bool = True,
    cuda_wait_s: float = CUDA_WAIT_S,
) -> ClaimedJob | None:
    """Take the oldest available queued job, or None. Must open its transaction (see above).

    `cuda=False` (a worker without a GPU) skips jobs whose options ask for a CUDA device
    until they waited `cuda_wait_s` (see `_runnable`)."""
    now = _now(session)
    candidate = (
        select(Diagnosis.id)
        .where(Diagnosis.status == QUEUED, Diagnosis.available_at <= now)
        .where(_runnable(session, cuda, cuda_wait_s))
        .order_by(Diagnosis.available_at, Diagnosis.created_at)
        .limit(1)
    )
    if kinds is not None:
        candidate = candidate.where(Diagnosis.kind.in_(kinds))
    if is_postgres(session):
        candidate = candidate.with_for_update(skip_locked=True)
    row = session.execute(
        update(Diagnosis)
        .where(Diagnosis.id == candidate.scalar_subquery(), Diagnosis.status == QUEUED)
        .values(
            status=RUNNING,
            attempts=Diagnosis.attempts + 1,
            worker_id=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_s),
            started_at=now,
            error_code=None,
            error_message=None,
        )
        .returning(Diagnosis.id)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    job = session.execute(
        select(Diagnosis, ModelRecord.sha256, BatchRecord.sha256)
        .join(ModelRecord, ModelRecord.id == Diagnosis.model_id)
        .outerjoin(BatchRecord, BatchRecord.id == Diagnosis.batch_id)
        .where(Diagnosis.id == row[0])
    ).one()
    diagnosis, model_sha256, batch_sha256 = job
    session.refresh(diagnosis)
    return ClaimedJob(
        id=diagnosis.id,
        tenant_id=diagnosis.tenant_id,
        kind=diagnosis.kind,
        model_id=diagnosis.model_id,
        batch_id=diagnosis.batch_id,
        options=dict(diagnosis.options or {}),
        attempts=diagnosis.attempts,
        max_attempts=diagnosis.max_attempts,
        model_sha256=model_sha256,
        batch_sha256=batch_sha256,
    )


def heartbeat(
    session: Session, worker_id: str, job_ids: list[str], *, lease_s: float
) -> HeartbeatResult:
    """Extend the leases of `job_ids` held by `worker_id`; say which ones must stop."""
    if not job_ids:
        return HeartbeatResult(frozenset(), frozenset())
    now = _now(session)
    renewed = session.execute(
        update(Diagnosis)
        .where(
            Diagnosis.id.in_(job_ids),
            Diagnosis.worker_id == worker_id,
            Diagnosis.status == RUNNING,
            Diagnosis.cancel_requested.is_(False),
        )
        .values(lease_expires_at=now + timedelta(seconds=lease_s))
        .returning(Diagnosis.id)
        .execution_options(synchronize_session=False)
    ).scalars()
    return HeartbeatResult(frozenset(renewed), cancelled_among(session, job_ids))


def cancelled_among(session: Session, job_ids: list[str]) -> frozenset[str]:
    """The ids among `job_ids` whose cancellation was asked for."""
    if not job_ids:
        return frozenset()
    ids = session.execute(
        select(Diagnosis.id).where(Diagnosis.id.in_(job_ids), Diagnosis.cancel_requested.is_(True))
    ).scalars()
    return frozenset(ids)


def finish_cancelled(session: Session, job_id: str) -> bool:
    """The worker stopped a job whose cancellation was asked for (the API's `:cancel` sets
    `cancel_requested` on a running job: `repositories.diagnoses.request_cancel`)."""
    done = session.execute(
        update(Diagnosis)
        .where(Diagnosis.id == job_id, Diagnosis.status.in_((QUEUED, RUNNING)))
        .values(
            status=CANCELLED,
            finished_at=_now(session),
            lease_expires_at=None,
            error_code="cancelled",
            error_message="cancelled by the client while it ran; the worker stopped it",
        )
        .returning(Diagnosis.id)
        .execution_options(synchronize_session=False)
    ).first()
    return done is not None


def complete(session: Session, job_id: str, *, report: dict[str, Any], verdict: str | None) -> bool:
    """Store a diagnosis result. True if written; False if the job had already finished."""
    model_id = _finish_succeeded(session, job_id, report=report, verdict=verdict)
    if model_id is None:
        return False
    _fill_model_from_report(session, model_id, report)
    return True


def _finish_succeeded(
    session: Session, job_id: str, *, report: dict[str, Any], verdict: str | None
) -> str | None:
    """End an unfinished, uncancelled job `succeeded` with `report`. Returns its model id, or
    None if it had already finished or its cancellation was asked for."""
    written = session.execute(
        update(Diagnosis)
        .where(
            Diagnosis.id == job_id,
            Diagnosis.status.in_((QUEUED, RUNNING)),
            Diagnosis.cancel_requested.is_(False),
        )
        .values(
            status=SUCCEEDED,
            report=report,
            verdict=verdict,
            finished_at=_now(session),
            lease_expires_at=None,
            error_code=None,
            error_message=None,
        )
        .returning(Diagnosis.model_id)
        .execution_options(synchronize_session=False)
    ).first()
    return None if written is None else str(written[0])


def _fill_model_from_report(session: Session, model_id: str, report: dict[str, Any]) -> None:
    """A diagnosis loads the model anyway: if its inspection has not finished, use the report."""
    pending = session.execute(
        select(ModelRecord.id).where(
            ModelRecord.id == model_id, ModelRecord.inspection_status == "pending"
        )
    ).first()
    info = report.get("model") or {}
    if pending is None or "format" not in info:
        return
    _record_inspection(session, model_id, info)


def complete_inspection(session: Session, job_id: str, model_info: dict[str, Any]) -> bool:
    """Store an inspection result (`format`, `inputs`, `outputs`, `parameter_count`) on the
    job's model and finish the job. False if the job had already finished."""
    model_id = _finish_succeeded(session, job_id, report={"model": model_info}, verdict=None)
    if model_id is None:
        return False
    _record_inspection(session, model_id, model_info)
    return True


def _record_inspection(session: Session, model_id: str, info: dict[str, Any]) -> None:
    session.execute(
        update(ModelRecord)
        .where(ModelRecord.id == model_id)
        .values(
            format=info.get("format"),
            inputs=info.get("inputs") or [],
            outputs=info.get("outputs") or [],
            parameter_count=int(info.get("parameter_count") or 0),
            inspection_status="succeeded",
            inspection_error=None,
        )
        .execution_options(synchronize_session=False)
    )


def fail(
    session: Session, job_id: str, *, code: str, message: str, retry: bool = False
) -> str | None:
    """Record a failed attempt. With `retry` and attempts left, the job goes back to the queue
    (after a backoff); otherwise it ends `failed` with `code`/`message`. Returns the new status,
    or None if the job had already finished (a late report from a stalled worker)."""
    diagnosis = _lock_unfinished(session, job_id)
    if diagnosis is None:
        return None
    if retry and diagnosis.attempts < diagnosis.max_attempts:
        _back_to_queue(diagnosis, _clock_now(session), code=code, message=message)
    else:
        _finish_failed(diagnosis, _clock_now(session), code=code, message=message)
        if diagnosis.kind == KIND_INSPECT:
            _mark_inspection_failed(session, diagnosis.model_id, message)
    session.flush()
    return diagnosis.status


def requeue(session: Session, job_id: str, *, reason: str) -> str | None:
    """Give a running job back without counting the attempt (graceful shutdown: the job did
    nothing wrong). Returns the new status, or None if it had already finished."""
    diagnosis = _lock_unfinished(session, job_id)
    if diagnosis is None:
        return None
    diagnosis.attempts = max(0, diagnosis.attempts - 1)
    _back_to_queue(diagnosis, _clock_now(session), code=None, message=reason, delay_s=0.0)
    session.flush()
    notify_workers(session, diagnosis.id)
    return diagnosis.status


def _lock_unfinished(session: Session, job_id: str) -> Diagnosis | None:
    """The job's row locked for update, or None if it is gone or already finished."""
    diagnosis = session.execute(
        select(Diagnosis).where(Diagnosis.id == job_id).with_for_update()
    ).scalar_one_or_none()
    if diagnosis is None or diagnosis.status in FINISHED_STATUSES:
        return None
    return diagnosis


def requeue_expired(session: Session) -> list[tuple[str, str]]:
    """The reaper: running jobs whose lease expired (their worker died or hung without a
    heartbeat) go back to the queue, or end `failed` once `max_attempts` are spent.
    Returns (id, new status) pairs. Any worker may run it; SKIP LOCKED keeps reapers apart."""
    query = (
        select(Diagnosis)
        .where(Diagnosis.status == RUNNING, Diagnosis.lease_expires_at < _now(session))
        .order_by(Diagnosis.lease_expires_at)
        .limit(100)
    )
    if is_postgres(session):
        query = query.with_for_update(skip_locked=True)
    expired = session.execute(query).scalars().all()
    if not expired:
        return []
    changed: list[tuple[str, str]] = []
    now = _clock_now(session)
    for diagnosis in expired:
        if diagnosis.attempts < diagnosis.max_attempts:
            _back_to_queue(
                diagnosis,
                now,
                code=ERROR_LEASE_EXPIRED,
                message=f"worker {diagnosis.worker_id} stopped renewing its lease",
            )
        else:
            _finish_failed(
                diagnosis,
                now,
                code=ERROR_LEASE_EXPIRED,
                message=(
                    f"the job's worker stopped responding on each of its {diagnosis.attempts} "
                    "attempts (lease expired); the model may crash or hang the worker"
                ),
            )
            if diagnosis.kind == KIND_INSPECT:
                _mark_inspection_failed(session, diagnosis.model_id, diagnosis.error_message or "")
        changed.append((diagnosis.id, diagnosis.status))
    session.flush()
    for job_id, status in changed:
        if status == QUEUED:
            notify_workers(session, job_id)
    return changed


def _back_to_queue(
    diagnosis: Diagnosis,
    now: datetime,
    *,
    code: str | None,
    message: str | None,
    delay_s: float | None = None,
) -> None:
    """Queue the job again after `delay_s` (default: the backoff for its attempts), counted
    from `now` on the clock claims compare with (`_clock_now`)."""
    if delay_s is None:
        delay_s = min(MAX_RETRY_BACKOFF_S, RETRY_BACKOFF_S * 2 ** max(0, diagnosis.attempts - 1))
    diagnosis.status = QUEUED
    diagnosis.worker_id = None
    diagnosis.lease_expires_at = None
    diagnosis.available_at = now + timedelta(seconds=delay_s)
    # Kept for the client while it waits: why the last attempt did not finish.
    diagnosis.error_code = code
    diagnosis.error_message = message


def _finish_failed(diagnosis: Diagnosis, now: datetime, *, code: str, message: str) -> None:
    diagnosis.status = FAILED
    diagnosis.lease_expires_at = None
    diagnosis.finished_at = now
    diagnosis.error_code = code
    diagnosis.error_message = message


def _mark_inspection_failed(session: Session, model_id: str, message: str) -> None:
    session.execute(
        update(ModelRecord)
        .where(ModelRecord.id == model_id, ModelRecord.inspection_status == "pending")
        .values(inspection_status="failed", inspection_error=message)
        .execution_options(synchronize_session=False)
    )
