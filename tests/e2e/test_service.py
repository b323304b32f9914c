"""End to end with real processes on loopback ports: `gradhealth serve` on the embedded SQLite,
and `gradhealth api` + two `gradhealth worker --cpus 1` on Postgres, including a worker child
killed with SIGKILL in the middle of a job."""

from __future__ import annotations

import io
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import psycopg
import pytest
import torch
from sqlalchemy.engine import make_url
from torch import nn

from service.queue.wakeup import libpq_url
from service.workers.runner import TEST_HOLD_ENV
from tests.conftest import postgres_test_url
from tests.e2e.processes import (
    Service,
    base_env,
    free_port,
    run_cli,
    start,
    start_serve,
    wait_healthy,
    wait_until,
)
from tests.support.export import to_onnx

pytestmark = pytest.mark.slow

JOB_WAIT_S = 120.0
# First attempts of every job pause this long in the worker (tests only): long enough to kill
# the child mid-job after seeing the job `running`, short enough for the other jobs.
HOLD_S = "6"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("e2e-files")
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    example = torch.randn(2, 4)
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, x=rng.standard_normal((2, 4)).astype(np.float32), target=np.array([0, 2]))
    paths = {
        "model": directory / "tiny.onnx",
        "batch": directory / "batch.npz",
        "junk": directory / "junk.onnx",
    }
    paths["model"].write_bytes(to_onnx(module, example))
    paths["batch"].write_bytes(buffer.getvalue())
    paths["junk"].write_bytes(b"this is not a model")
    return paths


def upload_and_diagnose(url: str, key: str, files: dict[str, Path]) -> str:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        with files["model"].open("rb") as f:
            model = client.post("/v1/models", files={"file": ("tiny.onnx", f)}, data={"name": "t"})
        assert model.status_code == 201, model.text
        with files["batch"].open("rb") as f:
            batch = client.post("/v1/batches", files={"file": ("batch.npz", f)})
        assert batch.status_code == 201, batch.text
        queued = client.post(
            "/v1/diagnoses", json={"model_id": model.json()["id"], "batch_id": batch.json()["id"]}
        )
        assert queued.status_code == 202, queued.text
        assert queued.headers["Location"].endswith(queued.json()["id"])
        return str(queued.json()["id"])


def poll(url: str, key: str, diagnosis_id: str, *, until: tuple[str, ...]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}

    def current() -> dict[str, Any] | None:
        body: dict[str, Any] = httpx.get(
            f"{url}/v1/diagnoses/{diagnosis_id}", headers=headers, timeout=10
        ).json()
        return body if body["status"] in until else None

    return wait_until(current, f"diagnosis {diagnosis_id} to be {until}", JOB_WAIT_S)


def submit(url: str, key: str, model: Path, batch: Path, *extra: str) -> Any:
    return run_cli(
        ["submit", str(model), "--batch", str(batch), "--server", url, "--wait", *extra],
        base_env(GRADHEALTH_API_KEY=key),
        timeout=JOB_WAIT_S,
    )


def stop_all(services: list[Service]) -> None:
    for service in services:
        service.stop()


# -- the embedded default ------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    service, key = start_serve(tmp_path / "data", tmp_path)
    try:
        assert service.url is not None  # start_serve sets it once the service answers
        yield service.url, key
    finally:
        stop_all([service])


def test_serve_on_sqlite_diagnoses_an_upload(
    served: tuple[str, str], files: dict[str, Path]
) -> None:
    url, key = served
    diagnosis_id = upload_and_diagnose(url, key, files)
    done = poll(url, key, diagnosis_id, until=("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done.get("error")
    assert done["attempts"] == 1
    report = done["report"]
    assert report["report_version"] == "1" and report["model"]["format"] == "onnx"
    assert report["verdict"] in ("healthy", "at_risk", "unhealthy")
    assert [layer["name"] for layer in report["layers"]]

    result = submit(url, key, files["model"], files["batch"], "--format", "json")
    assert result.returncode in (0, 1), result.stderr
    again = json.loads(result.stdout)
    assert again["model"]["sha256"] == report["model"]["sha256"]
    # the one worker child kept the model it loaded for the first diagnosis
    assert not any("worker's cache" in note for note in report["notes"])
    assert any("worker's cache" in note for note in again["notes"]), again["notes"]
    assert again["timing"]["load"] < 1e-3

    # weights in a data file beside the .onnx (torch.onnx.export's default): sent as a bundle
    external = files["model"].parent / "external" / "tiny.onnx"
    external.parent.mkdir(exist_ok=True)
    onnx.save_model(
        onnx.load(str(files["model"])),
        str(external),
        save_as_external_data=True,
        location="tiny.onnx.data",
        size_threshold=0,
    )
    bundled = submit(url, key, external, files["batch"], "--format", "json")
    assert bundled.returncode in (0, 1), bundled.stderr
    assert json.loads(bundled.stdout)["loss"]["value"] == pytest.approx(again["loss"]["value"])

    bad = submit(url, key, files["junk"], files["batch"])
    assert bad.returncode == 2, (bad.stdout, bad.stderr)
    assert "bad_model" in bad.stderr or "not ONNX" in bad.stderr


# -- API and workers apart, on Postgres ----------------------------------------------------------


@pytest.fixture
def e2e_database_url() -> str:
    """A database of its own (the processes migrate it), fresh for each test."""
    url = make_url(postgres_test_url())
    name = f"{url.database}_e2e"
    with psycopg.connect(libpq_url(str(url.set(database="postgres"))), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def deployment(e2e_database_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    env = base_env(GRADHEALTH_DATABASE_URL=e2e_database_url)
    migrated = run_cli(["migrate"], env)
    assert migrated.returncode == 0, migrated.stderr
    created = run_cli(["keys", "create", "--tenant", "e2e"], env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    port = free_port()
    services = [
        start(
            "api",
            ["api", "--port", str(port)],
            {**env, "GRADHEALTH_DATA_DIR": str(tmp_path / "api")},
            tmp_path,
        )
    ]
    services[0].url = f"http://127.0.0.1:{port}"
    for i in range(2):
        worker_env = {**env, "GRADHEALTH_DATA_DIR": str(tmp_path / f"w{i}"), TEST_HOLD_ENV: HOLD_S}
        services.append(start(f"worker{i}", ["worker", "--cpus", "1"], worker_env, tmp_path))
    try:
        wait_healthy(services[0])
        yield str(services[0].url), key
    finally:
        stop_all(services)
        for service in services:
            if service.process.returncode not in (0, -signal.SIGTERM):
                print(service.log())  # shown by pytest when the test failed


def child_pid_running(database_url: str, diagnosis_id: str) -> int | None:
    """The worker child running the job: its pid ends the row's worker_id (host:pid/child)."""
    with psycopg.connect(libpq_url(database_url)) as conn:
        row = conn.execute(
            "SELECT status, worker_id FROM diagnoses WHERE id = %s", (diagnosis_id,)
        ).fetchone()
    if row is None or row[0] != "running" or not row[1]:
        return None
    return int(row[1].rsplit("/", 1)[1])


def test_api_and_two_workers_on_postgres_survive_a_killed_child(
    deployment: tuple[str, str], files: dict[str, Path], e2e_database_url: str
) -> None:
    url, key = deployment
    first = upload_and_diagnose(url, key, files)
    done = poll(url, key, first, until=("succeeded", "failed", "cancelled"))
    assert (done["status"], done["attempts"]) == ("succeeded", 1), done.get("error")
    assert done["report"]["model"]["format"] == "onnx"

    headers = {"Authorization": f"Bearer {key}"}
    second = httpx.post(
        f"{url}/v1/diagnoses",
        headers=headers,
        json={"model_id": done["model_id"], "batch_id": done["batch_id"]},
        timeout=30,
    ).json()["id"]
    pid = wait_until(lambda: child_pid_running(e2e_database_url, second), "the job to run", 60)
    os.kill(pid, signal.SIGKILL)
    survived = poll(url, key, second, until=("succeeded", "failed", "cancelled"))
    assert (survived["status"], survived["attempts"]) == ("succeeded", 2), survived.get("error")
    assert survived["report"]["model"]["sha256"] == done["report"]["model"]["sha256"]
    listed = httpx.get(f"{url}/v1/diagnoses", headers=headers, timeout=10).json()["items"]
    assert sorted(item["id"] for item in listed) == sorted([first, second])
