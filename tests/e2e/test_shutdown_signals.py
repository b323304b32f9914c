"""Stopping real `gradhealth serve` / `gradhealth worker` processes in the middle of a job.

SIGTERM (what `docker stop` and systemd send) must do what Ctrl-C does: stop claiming, give the
running job `--grace` seconds, then requeue it without counting the attempt, and stop the
worker child; the process exits. A supervisor killed outright (SIGKILL) must not leave its
child computing on as an orphan.

Jobs are held in the child by the test hook GRADHEALTH_WORKER_TEST_HOLD_S (longer than any
test waits), so "running" lasts until the test stops it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from service.workers.runner import TEST_HOLD_ENV
from tests.e2e.processes import (
    Service,
    base_env,
    free_port,
    start,
    wait_for_log,
    wait_healthy,
    wait_until,
)
from tests.support.export import to_onnx

pytestmark = pytest.mark.slow

HOLD_S = "120"  # the job "runs" until the test stops it
EXIT_WAIT_S = 25.0
GONE_WAIT_S = 10.0


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("signal-files")
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model, batch = directory / "tiny.onnx", directory / "batch.npz"
    model.write_bytes(to_onnx(module, torch.randn(2, 4)))
    rng = np.random.default_rng(0)
    np.savez(batch, x=rng.standard_normal((2, 4)).astype(np.float32), target=np.array([0, 2]))
    return model, batch


def _serve(data_dir: Path, log_dir: Path, *args: str, name: str = "serve") -> tuple[Service, str]:
    port = free_port()
    env = base_env(GRADHEALTH_DATA_DIR=str(data_dir), **{TEST_HOLD_ENV: HOLD_S})
    service = start(name, ["serve", "--port", str(port), *args], env, log_dir)
    service.url = f"http://127.0.0.1:{port}"
    try:
        log = wait_for_log(service, "API key for tenant")
        key = log.split("API key for tenant", 1)[1].splitlines()[1].strip()
        wait_healthy(service)
    except BaseException:
        _kill(service)
        raise
    return service, key


def _kill(service: Service) -> None:
    """Cleanup after a failed test: the whole process group, children included."""
    if service.process.poll() is None:
        service.stop()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(service.process.pid, signal.SIGKILL)


def _queue_diagnosis(url: str, key: str, files: tuple[Path, Path]) -> None:
    model, batch = files
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as client:
        posted = client.post(
            "/v1/diagnoses:run",
            files={
                "model": (model.name, model.read_bytes()),
                "batch": (batch.name, batch.read_bytes()),
            },
        )
        assert posted.status_code == 202, posted.text


def _row(data_dir: Path, job_id: str) -> tuple[str, int, str | None]:
    with sqlite3.connect(data_dir / "gradhealth.sqlite3", timeout=10) as conn:
        row = conn.execute(
            "SELECT status, attempts, error_message FROM diagnoses WHERE id = ?", (job_id,)
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def _running_job(data_dir: Path) -> tuple[str, int]:
    """The held job (the upload's inspection runs first) and the pid of the worker child
    running it (worker_id is host:supervisor/child)."""

    def running() -> tuple[str, int] | None:
        with sqlite3.connect(data_dir / "gradhealth.sqlite3", timeout=10) as conn:
            row = conn.execute(
                "SELECT id, worker_id FROM diagnoses WHERE status = 'running'"
            ).fetchone()
        if row is None or not row[1]:
            return None
        return str(row[0]), int(row[1].rsplit("/", 1)[1])

    job = wait_until(running, "a job to run", 120)
    return str(job[0]), int(job[1])


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _assert_stopped_and_requeued(
    service: Service, data_dir: Path, job_id: str, child: int, stopped: tuple[str, str]
) -> None:
    started = time.monotonic()
    try:
        service.process.wait(EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{service.name} did not exit on SIGTERM:\n{service.log()}") from None
    assert time.monotonic() - started < EXIT_WAIT_S
    log = service.log()
    assert service.process.returncode == 0, log
    assert stopped[0] in log and stopped[1] in log, log
    wait_until(lambda: not _alive(child), f"worker child {child} to be gone", GONE_WAIT_S)
    status, attempts, error = _row(data_dir, job_id)
    assert (status, attempts) == ("queued", 0), (status, attempts, error, log)
    assert error is not None and "the worker shut down" in error, error


def test_sigterm_to_serve_requeues_the_running_job_and_stops_its_child(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    service, key = _serve(data_dir, tmp_path, "--workers", "1", "--grace", "0.5")
    try:
        assert service.url is not None
        _queue_diagnosis(service.url, key, files)
        job_id, child = _running_job(data_dir)
        wait_for_log(service, "holding job")
        service.process.send_signal(signal.SIGTERM)
        _assert_stopped_and_requeued(
            service, data_dir, job_id, child, ("stopping the workers", "workers stopped")
        )
    finally:
        _kill(service)


def test_sigterm_to_worker_requeues_the_running_job_and_stops_its_child(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    api, key = _serve(data_dir, tmp_path, "--workers", "0", name="api")
    env = base_env(GRADHEALTH_DATA_DIR=str(data_dir), **{TEST_HOLD_ENV: HOLD_S})
    worker = start("worker", ["worker", "--cpus", "1", "--grace", "0.5"], env, tmp_path)
    try:
        assert api.url is not None
        _queue_diagnosis(api.url, key, files)
        job_id, child = _running_job(data_dir)
        wait_for_log(worker, "holding job")
        worker.process.send_signal(signal.SIGTERM)
        _assert_stopped_and_requeued(
            worker, data_dir, job_id, child, ("stopping: running jobs get", "supervisor stopped")
        )
    finally:
        _kill(worker)
        _kill(api)


def test_a_killed_supervisor_leaves_no_orphan_child(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    service, key = _serve(data_dir, tmp_path, "--workers", "1")
    try:
        assert service.url is not None
        _queue_diagnosis(service.url, key, files)
        _job_id, child = _running_job(data_dir)
        wait_for_log(service, "holding job")
        service.process.send_signal(signal.SIGKILL)
        service.process.wait(10)
        wait_until(lambda: not _alive(child), f"orphaned child {child} to exit", GONE_WAIT_S)
    finally:
        _kill(service)
