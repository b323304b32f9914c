"""The worker pool with real child processes, a real database and real model files.

Inspection jobs (format, inputs, outputs, parameter count of an uploaded model) exercise the
supervisor here: they run real model loaders in the child and take a fraction of a second, so
the failure paths (killed child, timeout, cancel, shutdown) are cheap to test. The child's
test hook `GRADHEALTH_WORKER_TEST_HOLD_S` (service/workers/runner.py) keeps a job's first
attempt running long enough to act on it, whatever the machine's speed.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing import Pipe, get_context
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from service.config import Settings
from service.db.models import Diagnosis, ModelRecord
from service.db.session import Database
from service.queue import jobs
from service.workers import Supervisor
from service.workers.protocol import JobResult
from service.workers.runner import TEST_HOLD_ENV
from tests.conftest import Backend
from tests.support.export import to_torchscript
from tests.support.jobs import Owner, make_uploaded_owner

pytestmark = pytest.mark.slow

WAIT_S = 60.0
# The failure paths are the supervisor's own logic, the same on both databases: run them on
# Postgres (production) only, to keep the suite's time down; the basic paths run on both.
POSTGRES_ONLY = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


def tiny_model_bytes() -> bytes:
    torch.manual_seed(0)
    return to_torchscript(
        nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), torch.randn(2, 4)
    )


def tiny_batch_bytes() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buffer, x=rng.standard_normal((2, 4)).astype(np.float32), target=np.array([0, 1]))
    return buffer.getvalue()


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def row(database: Database, job_id: str) -> Diagnosis:
    with database.session() as session:
        return session.get_one(Diagnosis, job_id)


def finished(database: Database, job_id: str) -> Diagnosis | None:
    current = row(database, job_id)
    return current if current.status in jobs.FINISHED_STATUSES else None


def running_pid(supervisor: Supervisor, job_id: str) -> int | None:
    for child in supervisor.children():
        if child["job_id"] == job_id:
            return child["pid"]
    return None


@pytest.fixture
def owner(backend: Backend) -> Owner:
    return make_uploaded_owner(
        backend.settings, backend.database, tiny_model_bytes(), tiny_batch_bytes()
    )


@pytest.fixture
def run_supervisor(backend: Backend) -> Iterator[Callable[..., Supervisor]]:
    started: list[Supervisor] = []

    def start(settings: Settings | None = None, **kwargs: Any) -> Supervisor:
        supervisor = Supervisor(settings or backend.settings, cpus=1, **kwargs)
        supervisor.start()
        started.append(supervisor)
        wait_for(lambda: all(c["ready"] for c in supervisor.children()), "the child to start")
        return supervisor

    yield start
    for supervisor in started:
        supervisor.stop()
        supervisor.stop()
        assert supervisor.join(30)


def enqueue_inspection(database: Database, owner: Owner, max_attempts: int = 3) -> str:
    with database.session() as session:
        model = session.get_one(ModelRecord, owner.model_id)
        job_id = jobs.enqueue_inspection(session, model, max_attempts=max_attempts).id
        session.commit()
    return job_id


def start_held_inspection(
    backend: Backend,
    owner: Owner,
    run_supervisor: Callable[..., Supervisor],
    monkeypatch: pytest.MonkeyPatch,
    *,
    hold_s: float = 60,
    max_attempts: int = 3,
    **supervisor_kwargs: Any,
) -> tuple[Supervisor, str, int]:
    """Start a pool whose child holds the first attempt of an inspection `hold_s` seconds
    and return once that job runs: (the supervisor, the job id, the child's pid)."""
    monkeypatch.setenv(TEST_HOLD_ENV, str(hold_s))
    supervisor = run_supervisor(**supervisor_kwargs)
    job_id = enqueue_inspection(backend.database, owner, max_attempts=max_attempts)
    pid = wait_for(lambda: running_pid(supervisor, job_id), "the job to start")
    return supervisor, job_id, pid


def test_inspection_fills_the_model_from_its_bytes(
    backend: Backend, owner: Owner, run_supervisor: Callable[..., Supervisor]
) -> None:
    run_supervisor()
    job_id = enqueue_inspection(backend.database, owner)
    done = wait_for(lambda: finished(backend.database, job_id), "the inspection")
    assert done.status == "succeeded" and done.attempts == 1
    with backend.database.session() as session:
        model = session.get_one(ModelRecord, owner.model_id)
    assert model.format == "torchscript" and model.inspection_status == "succeeded"
    assert model.parameter_count == 4 * 3 + 3 + 3 * 2 + 2
    # TorchScript declares its inputs' names only: shape and dtype are unknown (null)
    assert model.inputs is not None and len(model.inputs) == 1 and model.inputs[0]["name"]
    assert model.inputs[0]["shape"] is None and model.inputs[0]["dtype"] is None


def enqueue_diagnosis_on(database: Database, owner: Owner, device: str) -> str:
    with database.session() as session:
        job_id = jobs.enqueue(
            session,
            owner.tenant_id,
            kind="diagnose",
            model_id=owner.model_id,
            batch_id=owner.batch_id,
            options={"device": device},
            max_attempts=3,
        ).id
        session.commit()
    return job_id


def test_a_cpu_worker_leaves_cuda_jobs_to_gpu_workers(
    backend: Backend, owner: Owner, run_supervisor: Callable[..., Supervisor]
) -> None:
    needs_gpu = enqueue_diagnosis_on(backend.database, owner, "cuda")
    anywhere = enqueue_diagnosis_on(backend.database, owner, "auto")
    run_supervisor()
    done = wait_for(lambda: finished(backend.database, anywhere), "the auto job")
    assert done.status == "succeeded", done.error_message
    waiting = row(backend.database, needs_gpu)
    assert (waiting.status, waiting.attempts) == ("queued", 0)


@POSTGRES_ONLY
def test_a_bad_model_fails_its_inspection_without_retry(
    backend: Backend, run_supervisor: Callable[..., Supervisor]
) -> None:
    owner = make_uploaded_owner(
        backend.settings, backend.database, b"not a model at all", tiny_batch_bytes()
    )
    run_supervisor()
    job_id = enqueue_inspection(backend.database, owner)
    done = wait_for(lambda: finished(backend.database, job_id), "the inspection")
    assert (done.status, done.error_code, done.attempts) == ("failed", "bad_model", 1)
    with backend.database.session() as session:
        model = session.get_one(ModelRecord, owner.model_id)
    assert model.inspection_status == "failed" and "ONNX" in (model.inspection_error or "")


def test_a_killed_child_is_replaced_and_its_job_runs_again(
    backend: Backend,
    owner: Owner,
    run_supervisor: Callable[..., Supervisor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    supervisor, job_id, pid = start_held_inspection(backend, owner, run_supervisor, monkeypatch)
    os.kill(pid, signal.SIGKILL)
    done = wait_for(lambda: finished(backend.database, job_id), "the second attempt")
    assert (done.status, done.attempts) == ("succeeded", 2)
    assert supervisor.children()[0]["pid"] not in (None, pid)


@POSTGRES_ONLY
def test_a_child_that_always_dies_ends_the_job_failed(
    backend: Backend,
    owner: Owner,
    run_supervisor: Callable[..., Supervisor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, job_id, pid = start_held_inspection(
        backend, owner, run_supervisor, monkeypatch, max_attempts=1
    )
    os.kill(pid, signal.SIGKILL)
    done = wait_for(lambda: finished(backend.database, job_id), "the failure")
    assert (done.status, done.error_code) == ("failed", "worker_crashed")
    assert "signal 9" in (done.error_message or "")


@POSTGRES_ONLY
def test_a_job_past_the_timeout_is_stopped(
    backend: Backend,
    owner: Owner,
    run_supervisor: Callable[..., Supervisor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    timeout_settings = backend.settings.model_copy(update={"job_timeout_s": 1.0})
    supervisor, job_id, pid = start_held_inspection(
        backend, owner, run_supervisor, monkeypatch, settings=timeout_settings
    )
    done = wait_for(lambda: finished(backend.database, job_id), "the timeout")
    assert (done.status, done.error_code, done.attempts) == ("failed", "timeout", 1)
    assert "GRADHEALTH_JOB_TIMEOUT_S" in (done.error_message or "")
    wait_for(lambda: supervisor.children()[0]["ready"], "the replacement child")
    assert supervisor.children()[0]["pid"] != pid


@POSTGRES_ONLY
def test_cancelling_a_running_job_stops_it(
    backend: Backend,
    owner: Owner,
    run_supervisor: Callable[..., Supervisor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    supervisor, job_id, pid = start_held_inspection(backend, owner, run_supervisor, monkeypatch)
    with backend.database.session() as session:
        jobs.request_cancel(session, session.get_one(Diagnosis, job_id))
        session.commit()
    done = wait_for(lambda: finished(backend.database, job_id), "the cancellation", timeout=10)
    assert done.status == "cancelled" and done.report is None
    assert wait_for(lambda: supervisor.children()[0]["pid"] not in (None, pid), "a new child")


@POSTGRES_ONLY
def test_graceful_stop_requeues_a_job_that_does_not_finish_in_time(
    backend: Backend,
    owner: Owner,
    run_supervisor: Callable[..., Supervisor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    supervisor, job_id, _ = start_held_inspection(
        backend, owner, run_supervisor, monkeypatch, grace_s=0.5
    )
    supervisor.stop()
    assert supervisor.join(30)
    current = row(backend.database, job_id)
    assert (current.status, current.attempts, current.worker_id) == ("queued", 0, None)


@POSTGRES_ONLY
def test_graceful_stop_lets_a_running_job_finish(
    backend: Backend,
    owner: Owner,
    run_supervisor: Callable[..., Supervisor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    supervisor, job_id, _ = start_held_inspection(
        backend, owner, run_supervisor, monkeypatch, hold_s=1, grace_s=30
    )
    supervisor.stop()
    assert supervisor.join(30)
    assert row(backend.database, job_id).status == "succeeded"


@POSTGRES_ONLY
def test_a_job_left_by_a_dead_worker_is_taken_over(
    backend: Backend, owner: Owner, run_supervisor: Callable[..., Supervisor]
) -> None:
    """Another worker claimed the job and vanished (its lease ran out): this pool's reaper
    puts the job back and runs it."""
    job_id = enqueue_inspection(backend.database, owner)
    with backend.database.session() as session:
        claimed = jobs.claim(session, "gone-host:1/2", lease_s=0.01)
        session.commit()
    assert claimed is not None and claimed.id == job_id
    run_supervisor()
    done = wait_for(lambda: finished(backend.database, job_id), "the takeover")
    assert (done.status, done.attempts) == ("succeeded", 2)
    assert done.worker_id != "gone-host:1/2"


def test_a_result_sent_just_before_the_child_died_is_recorded(
    backend: Backend, owner: Owner
) -> None:
    """The child answered, then died before the supervisor read the pipe: the answer counts,
    not a crash (which would requeue a finished job and spend an attempt)."""
    supervisor = Supervisor(backend.settings, cpus=1, database=backend.database)
    slot = supervisor.slots[0]
    slot.worker_id = "this-host:1/2"
    job_id = enqueue_inspection(backend.database, owner, max_attempts=1)
    with backend.database.session() as session:
        claimed = jobs.claim(session, slot.worker_id, lease_s=60)
        session.commit()
    assert claimed is not None and claimed.id == job_id
    parent_end, child_end = Pipe()
    info = {"format": "torchscript", "inputs": [], "outputs": [], "parameter_count": 29}
    child_end.send(JobResult(job_id, ok=True, model_info=info))
    child_end.close()
    dead = get_context("fork").Process(target=sys.exit, args=(0,))
    dead.start()
    dead.join()
    slot.process, slot.conn, slot.ready, slot.job = dead, parent_end, True, claimed
    supervisor._reap_dead_children(time.monotonic())
    done = row(backend.database, job_id)
    assert (done.status, done.attempts, done.error_code) == ("succeeded", 1, None)
