"""The queue (service/queue/jobs.py) on real Postgres and on the embedded SQLite file."""

from __future__ import annotations

import multiprocessing
import select
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import select as sql_select
from sqlalchemy import update

from service.db.models import Diagnosis, ModelRecord, utcnow
from service.db.session import Database
from service.queue import jobs
from service.queue import jobs as diagnoses_repo
from service.queue.wakeup import Listener
from tests.conftest import Backend
from tests.support.jobs import Owner, claim_until_empty, enqueue_diagnosis, make_owner


@pytest.fixture
def database(backend: Backend) -> Database:
    return backend.database


@pytest.fixture
def settings_kwargs(backend: Backend) -> dict[str, object]:
    """What a claimer process needs to reach the same database."""
    return {"database_url": backend.settings.database_url, "data_dir": backend.settings.data_dir}


@pytest.fixture
def owner(database: Database) -> Owner:
    with database.session() as session:
        result = make_owner(session)
        session.commit()
    return result


def _enqueue(database: Database, owner: Owner, n: int = 1, max_attempts: int = 3) -> list[str]:
    with database.session() as session:
        ids = [enqueue_diagnosis(session, owner, max_attempts=max_attempts).id for _ in range(n)]
        session.commit()
    return ids


def _cancel(database: Database, job_id: str) -> None:
    with database.session() as session:
        diagnoses_repo.request_cancel(session, session.get_one(Diagnosis, job_id))
        session.commit()


def _claim(database: Database, worker: str = "w1", lease_s: float = 60) -> jobs.ClaimedJob | None:
    with database.session() as session:
        job = jobs.claim(session, worker, lease_s=lease_s)
        session.commit()
    return job


def _row(database: Database, job_id: str) -> Diagnosis:
    with database.session() as session:
        return session.execute(sql_select(Diagnosis).where(Diagnosis.id == job_id)).scalar_one()


def _expire_lease(database: Database, job_id: str) -> None:
    with database.session() as session:
        session.execute(
            update(Diagnosis)
            .where(Diagnosis.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=5))
        )
        session.commit()


def _make_available(database: Database, job_id: str) -> None:
    """Skip the retry backoff."""
    with database.session() as session:
        session.execute(
            update(Diagnosis).where(Diagnosis.id == job_id).values(available_at=utcnow())
        )
        session.commit()


def test_claim_takes_the_oldest_job_once_and_counts_the_attempt(
    database: Database, owner: Owner
) -> None:
    first, second = _enqueue(database, owner, 2)
    job = _claim(database, "w1")
    assert job is not None and job.id == first
    assert job.attempts == 1 and job.kind == "diagnose"
    assert job.model_sha256 and job.batch_sha256
    row = _row(database, first)
    assert row.status == "running" and row.worker_id == "w1"
    assert row.lease_expires_at is not None and row.lease_expires_at > utcnow()
    job2 = _claim(database, "w2")
    assert job2 is not None and job2.id == second
    assert _claim(database, "w3") is None


def test_jobs_not_yet_available_are_not_claimed(database: Database, owner: Owner) -> None:
    (job_id,) = _enqueue(database, owner)
    with database.session() as session:
        session.execute(
            update(Diagnosis)
            .where(Diagnosis.id == job_id)
            .values(available_at=utcnow() + timedelta(hours=1))
        )
        session.commit()
    with database.session() as session:
        assert not jobs.has_available(session)
    assert _claim(database) is None


def test_concurrent_claimers_take_every_job_exactly_once(
    database: Database, owner: Owner, settings_kwargs: dict[str, object]
) -> None:
    processes, per_process = 4, 200
    expected = set(_enqueue(database, owner, processes * per_process))
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(processes)
    results = ctx.Queue()
    claimers = [
        ctx.Process(target=claim_until_empty, args=(settings_kwargs, f"w{i}", start, results))
        for i in range(processes)
    ]
    for process in claimers:
        process.start()
    done_by = dict(results.get(timeout=120) for _ in claimers)
    for process in claimers:
        process.join(timeout=30)
        assert process.exitcode == 0
    counts = Counter(job_id for done in done_by.values() for job_id in done)
    assert set(counts) == expected
    assert max(counts.values()) == 1
    # More than one claimer got work: the test exercised concurrency, not one fast process.
    assert sum(1 for done in done_by.values() if done) >= 2
    with database.session() as session:
        rows = session.execute(sql_select(Diagnosis.status, Diagnosis.attempts)).all()
    assert Counter(rows) == Counter({("succeeded", 1): len(expected)})


def test_heartbeat_extends_only_the_holders_lease(database: Database, owner: Owner) -> None:
    (job_id,) = _enqueue(database, owner)
    assert _claim(database, "w1", lease_s=5) is not None
    before = _row(database, job_id).lease_expires_at
    with database.session() as session:
        result = jobs.heartbeat(session, "w1", [job_id], lease_s=600)
        stranger = jobs.heartbeat(session, "w2", [job_id], lease_s=6000)
        session.commit()
    assert result.renewed == {job_id} and not result.stop
    assert stranger.renewed == frozenset()
    after = _row(database, job_id).lease_expires_at
    assert before is not None and after is not None
    assert after - before > timedelta(seconds=500)
    assert after - utcnow() < timedelta(seconds=601)


def test_expired_lease_requeues_until_max_attempts_then_fails(
    database: Database, owner: Owner
) -> None:
    (job_id,) = _enqueue(database, owner, max_attempts=2)
    for attempt in (1, 2):
        job = _claim(database, f"w{attempt}")
        assert job is not None and job.id == job_id and job.attempts == attempt
        _expire_lease(database, job_id)
        with database.session() as session:
            changed = jobs.requeue_expired(session)
            session.commit()
        expected_status = "queued" if attempt == 1 else "failed"
        assert changed == [(job_id, expected_status)]
        _make_available(database, job_id)
    row = _row(database, job_id)
    assert row.status == "failed" and row.attempts == 2
    assert row.error_code == "lease_expired"
    assert "2 attempts" in (row.error_message or "")
    assert row.finished_at is not None
    assert _claim(database) is None


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # SQLite: one machine, one clock
def test_a_requeue_from_a_worker_with_a_fast_clock_waits_only_its_backoff(
    database: Database, owner: Owner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claims compare `available_at` with the database clock: a requeue must set it on that
    clock too, or a worker whose clock runs an hour ahead hides the job for an hour."""
    (job_id,) = _enqueue(database, owner)
    assert _claim(database) is not None
    monkeypatch.setattr(jobs, "utcnow", lambda: utcnow() + timedelta(hours=1))
    with database.session() as session:
        jobs.fail(session, job_id, code="worker_crashed", message="signal 9", retry=True)
        session.commit()
    row = _row(database, job_id)
    assert (row.status, row.attempts) == ("queued", 1)
    assert row.available_at < utcnow() + timedelta(seconds=jobs.MAX_RETRY_BACKOFF_S)


def test_requeued_job_waits_for_its_backoff(database: Database, owner: Owner) -> None:
    (job_id,) = _enqueue(database, owner)
    assert _claim(database) is not None
    with database.session() as session:
        status = jobs.fail(session, job_id, code="worker_crashed", message="signal 9", retry=True)
        session.commit()
    assert status == "queued"
    row = _row(database, job_id)
    assert row.available_at > utcnow()
    assert row.error_code == "worker_crashed" and row.worker_id is None
    assert _claim(database) is None
    _make_available(database, job_id)
    job = _claim(database)
    assert job is not None and job.attempts == 2


def test_fail_without_retry_ends_the_job(database: Database, owner: Owner) -> None:
    (job_id,) = _enqueue(database, owner)
    assert _claim(database) is not None
    with database.session() as session:
        status = jobs.fail(session, job_id, code="bad_batch", message="no array 'x'")
        session.commit()
    assert status == "failed"
    row = _row(database, job_id)
    assert (row.error_code, row.error_message, row.attempts) == ("bad_batch", "no array 'x'", 1)


def test_cancel_a_queued_job(database: Database, owner: Owner) -> None:
    (job_id,) = _enqueue(database, owner)
    _cancel(database, job_id)
    assert _row(database, job_id).status == "cancelled"
    assert _claim(database) is None


def test_cancel_a_running_job_stops_it_and_drops_its_result(
    database: Database, owner: Owner
) -> None:
    (job_id,) = _enqueue(database, owner)
    assert _claim(database, "w1") is not None
    _cancel(database, job_id)
    with database.session() as session:
        beat = jobs.heartbeat(session, "w1", [job_id], lease_s=60)
        late = jobs.complete(session, job_id, report={"late": True}, verdict="healthy")
        session.commit()
    assert beat.stop == {job_id} and not beat.renewed
    assert late is False
    with database.session() as session:
        assert jobs.finish_cancelled(session, job_id)
        session.commit()
    row = _row(database, job_id)
    assert row.status == "cancelled" and row.report is None and row.finished_at is not None


def test_cancel_of_a_finished_job_changes_nothing(database: Database, owner: Owner) -> None:
    (job_id,) = _enqueue(database, owner)
    assert _claim(database) is not None
    with database.session() as session:
        jobs.complete(session, job_id, report={"ok": 1}, verdict="healthy")
        session.commit()
    _cancel(database, job_id)
    assert _row(database, job_id).status == "succeeded"


def test_a_stalled_job_run_twice_keeps_one_result(database: Database, owner: Owner) -> None:
    """Worker A stalls, its lease expires, worker B runs the job again; both then report."""
    (job_id,) = _enqueue(database, owner)
    assert _claim(database, "A") is not None
    _expire_lease(database, job_id)
    with database.session() as session:
        jobs.requeue_expired(session)
        session.commit()
    _make_available(database, job_id)
    job_b = _claim(database, "B")
    assert job_b is not None and job_b.attempts == 2
    with database.session() as session:
        assert jobs.complete(session, job_id, report={"by": "A"}, verdict="healthy") is True
        assert jobs.complete(session, job_id, report={"by": "B"}, verdict="healthy") is False
        assert jobs.fail(session, job_id, code="internal_error", message="late") is None
        session.commit()
    row = _row(database, job_id)
    assert row.status == "succeeded" and row.report == {"by": "A"} and row.attempts == 2


def test_graceful_requeue_does_not_spend_an_attempt(database: Database, owner: Owner) -> None:
    (job_id,) = _enqueue(database, owner, max_attempts=1)
    assert _claim(database) is not None
    with database.session() as session:
        assert jobs.requeue(session, job_id, reason="worker shutting down") == "queued"
        session.commit()
    job = _claim(database)
    assert job is not None and job.attempts == 1


def test_a_diagnosis_fills_a_models_pending_inspection(database: Database, owner: Owner) -> None:
    (job_id,) = _enqueue(database, owner)
    assert _claim(database) is not None
    model_info = {"format": "onnx", "inputs": [{"name": "x"}], "outputs": [], "parameter_count": 7}
    with database.session() as session:
        jobs.complete(session, job_id, report={"model": model_info}, verdict="healthy")
        session.commit()
        model = session.get_one(ModelRecord, owner.model_id)
        assert (model.format, model.parameter_count, model.inspection_status) == (
            "onnx",
            7,
            "succeeded",
        )


def test_inspection_job_fills_the_model(database: Database, owner: Owner) -> None:
    with database.session() as session:
        job_id = diagnoses_repo.enqueue(
            session,
            owner.tenant_id,
            kind="inspect",
            model_id=owner.model_id,
            batch_id=None,
            options={},
            max_attempts=3,
        ).id
        session.commit()
    job = _claim(database)
    assert job is not None and job.kind == "inspect" and job.batch_sha256 is None
    info = {"format": "torchscript", "inputs": [], "outputs": [], "parameter_count": 3}
    with database.session() as session:
        assert jobs.complete_inspection(session, job_id, info)
        session.commit()
        model = session.get_one(ModelRecord, owner.model_id)
        assert (model.format, model.parameter_count) == ("torchscript", 3)


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # SQLite workers poll
def test_listener_hears_a_job_only_when_its_transaction_commits(
    database: Database, owner: Owner
) -> None:
    listener = Listener(str(database.engine.url.render_as_string(hide_password=False)))
    try:
        fileno = listener.fileno()
        assert fileno is not None
        with database.session() as session:
            enqueue_diagnosis(session, owner)
            assert select.select([fileno], [], [], 0.3)[0] == []
            assert not listener.drain().new_job
            session.commit()
        assert select.select([fileno], [], [], 5)[0] == [fileno]
        assert listener.drain().new_job
    finally:
        listener.close()


def _enqueue_on(database: Database, owner: Owner, device: str | None) -> str:
    with database.session() as session:
        job = jobs.enqueue(
            session,
            owner.tenant_id,
            kind="diagnose",
            model_id=owner.model_id,
            batch_id=owner.batch_id,
            options={} if device is None else {"device": device, "loss": "mse"},
            max_attempts=3,
        )
        session.commit()
        return job.id


def _claim_as(database: Database, *, cuda: bool, cuda_wait_s: float = 300) -> str | None:
    with database.session(read_only=True) as session:
        available = jobs.has_available(session, cuda=cuda, cuda_wait_s=cuda_wait_s)
    with database.session() as session:
        job = jobs.claim(session, "w", lease_s=60, cuda=cuda, cuda_wait_s=cuda_wait_s)
        session.commit()
    assert available == (job is not None)
    return job.id if job is not None else None


def test_workers_claim_only_jobs_they_can_run(database: Database, owner: Owner) -> None:
    needs_gpu = [_enqueue_on(database, owner, d) for d in ("cuda", " CUDA:1")]
    anywhere = [_enqueue_on(database, owner, d) for d in ("auto", "cpu", None)]
    # a CPU worker passes over the older cuda jobs and takes the rest in order
    assert [_claim_as(database, cuda=False) for _ in range(4)] == [*anywhere, None]
    # a GPU worker takes what is left
    assert [_claim_as(database, cuda=True) for _ in range(3)] == [*needs_gpu, None]


def test_a_cuda_job_no_gpu_worker_takes_goes_to_a_cpu_worker_after_the_wait(
    database: Database, owner: Owner
) -> None:
    job_id = _enqueue_on(database, owner, "cuda")
    assert _claim_as(database, cuda=False, cuda_wait_s=60) is None
    with database.session() as session:  # it has waited 61 s for a GPU worker
        session.execute(
            update(Diagnosis)
            .where(Diagnosis.id == job_id)
            .values(available_at=utcnow() - timedelta(seconds=61))
        )
        session.commit()
    assert _claim_as(database, cuda=False, cuda_wait_s=60) == job_id
