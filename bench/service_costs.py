"""The service's own costs, on real processes (run: `.venv/bin/python bench/service_costs.py`).

Prints, per database (embedded SQLite via `gradhealth serve`; Postgres via `gradhealth api` +
`gradhealth worker --cpus 1`):

1. submit→report latency MINUS the engine's own time (the report's `timing.total`) for a tiny
   ONNX model with a warm worker: what the queue, the worker hand-off, the database and HTTP
   add. Target ≤ 300 ms median. The client polls every `POLL_S`, which adds up to that much.
2. status-poll latency (GET /v1/diagnoses/{id} of a finished job, report included) with 100
   concurrent clients, each polling once per `--think-ms` (a pipeline waiting for its report)
   from a random starting point (pollers are not in step);
   baseline in the same run: GET /healthz (no database) under the same load. Target p99
   ≤ 30 ms. The clients run on the same machine as the server (their own CPU time counts).
3. the API process's resident memory growth while a 1 GB batch upload streams through it
   (POST /v1/batches). Target < 100 MB.

Postgres: GRADHEALTH_BENCH_DATABASE_URL, default
postgresql+psycopg://postgres@127.0.0.1:5432/gradhealth_bench (dropped and re-created).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import torch
from sqlalchemy.engine import make_url
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.queue.wakeup import libpq_url
from tests.e2e.processes import (
    Service,
    base_env,
    free_port,
    run_cli,
    start,
    start_serve,
    wait_healthy,
)
from tests.support.export import to_onnx

POLL_S = 0.005
DEFAULT_BENCH_DB = "postgresql+psycopg://postgres@127.0.0.1:5432/gradhealth_bench"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def tiny_files(directory: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model = directory / "tiny.onnx"
    model.write_bytes(to_onnx(module, torch.randn(2, 4)))
    batch = directory / "batch.npz"
    rng = np.random.default_rng(0)
    np.savez(batch, x=rng.standard_normal((2, 4)).astype(np.float32), target=np.array([0, 2]))
    return model, batch


@contextmanager
def sqlite_service(work: Path) -> Iterator[tuple[Service, str]]:
    service, key = start_serve(work / "sqlite-data", work)
    try:
        yield service, key
    finally:
        service.stop()


@contextmanager
def postgres_service(work: Path, database_url: str) -> Iterator[tuple[Service, str]]:
    url = make_url(database_url)
    with psycopg.connect(libpq_url(str(url.set(database="postgres"))), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{url.database}"')
    env = base_env(GRADHEALTH_DATABASE_URL=database_url)
    for args in (["migrate"], ["keys", "create", "--tenant", "bench"]):
        done = run_cli(args, env)
        if done.returncode != 0:
            raise SystemExit(f"gradhealth {' '.join(args)} failed: {done.stderr}")
    key = done.stdout.strip().splitlines()[-1]
    port = free_port()
    api = start(
        "api", ["api", "--port", str(port)], {**env, "GRADHEALTH_DATA_DIR": str(work / "a")}, work
    )
    api.url = f"http://127.0.0.1:{port}"
    worker = start(
        "worker", ["worker", "--cpus", "1"], {**env, "GRADHEALTH_DATA_DIR": str(work / "w")}, work
    )
    try:
        wait_healthy(api)
        yield api, key
    finally:
        worker.stop()
        api.stop()


def upload(client: httpx.Client, model: Path, batch: Path) -> tuple[str, str]:
    with model.open("rb") as f:
        model_id = client.post("/v1/models", files={"file": (model.name, f)}).json()["id"]
    with batch.open("rb") as f:
        batch_id = client.post("/v1/batches", files={"file": (batch.name, f)}).json()["id"]
    return model_id, batch_id


def diagnose_once(client: httpx.Client, model_id: str, batch_id: str) -> tuple[float, float, Any]:
    """(client-observed submit→report seconds, engine seconds, the finished diagnosis)."""
    started = time.perf_counter()
    job = client.post("/v1/diagnoses", json={"model_id": model_id, "batch_id": batch_id}).json()
    while True:
        body = client.get(f"/v1/diagnoses/{job['id']}").json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(POLL_S)
    elapsed = time.perf_counter() - started
    if body["status"] != "succeeded":
        raise SystemExit(f"diagnosis {job['id']} ended {body['status']}: {body.get('error')}")
    return elapsed, float(body["report"]["timing"]["total"]), body


def latency(
    client: httpx.Client, model: Path, batch: Path, jobs: int
) -> tuple[dict[str, float], str]:
    model_id, batch_id = upload(client, model, batch)
    diagnose_once(client, model_id, batch_id)  # warm: the worker has converted this model once
    overheads, engines, waits, runs = [], [], [], []
    last_id = ""
    for _ in range(jobs):
        elapsed, engine, body = diagnose_once(client, model_id, batch_id)
        overheads.append(elapsed - engine)
        engines.append(engine)
        created, started, finished = (
            datetime.fromisoformat(body[k]) for k in ("created_at", "started_at", "finished_at")
        )
        waits.append((started - created).total_seconds())
        runs.append((finished - started).total_seconds() - engine)
        last_id = body["id"]
    return {
        "overhead_median_ms": 1000 * statistics.median(overheads),
        "overhead_p90_ms": 1000 * percentile(overheads, 90),
        "engine_median_ms": 1000 * statistics.median(engines),
        "queued→claimed_ms": 1000 * statistics.median(waits),
        "claimed→stored-engine_ms": 1000 * statistics.median(runs),
    }, last_id


async def _hammer(
    url: str, key: str, path: str, clients: int, seconds: float, think_s: float
) -> list[float]:
    samples: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=120) as http:

        async def one_client() -> None:
            # Independent pollers are not in step: each starts at a random point of its period.
            await asyncio.sleep(random.uniform(0, think_s))
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await http.get(path)
                samples.append(time.perf_counter() - started)
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:200]}")
                await asyncio.sleep(think_s)

        await asyncio.gather(*(one_client() for _ in range(clients)))
    if errors:
        print(f"  !! {len(errors)} of {len(samples)} answers were errors; first: {errors[0]}")
    return samples


def poll_latency(
    url: str, key: str, diagnosis_id: str, clients: int, seconds: float, think_s: float
) -> dict[str, float]:
    result: dict[str, float] = {}
    for label, path in (("healthz", "/healthz"), ("status", f"/v1/diagnoses/{diagnosis_id}")):
        print(f"  ({label}: {clients} clients for {seconds:g} s)", flush=True)
        samples = asyncio.run(_hammer(url, key, path, clients, seconds, think_s))
        result[f"{label}_p50_ms"] = 1000 * percentile(samples, 50)
        result[f"{label}_p99_ms"] = 1000 * percentile(samples, 99)
        result[f"{label}_requests_per_s"] = len(samples) / seconds
    result["p99_ratio_status_to_healthz"] = result["status_p99_ms"] / result["healthz_p99_ms"]
    return result


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def upload_memory(service: Service, key: str, work: Path, megabytes: int) -> dict[str, float]:
    big = work / "big.npz"
    rows = megabytes * 1024 * 1024 // (4 * 1024)
    np.savez(big, x=np.ones((rows, 1024), dtype=np.float32))  # stored uncompressed
    pid = service.process.pid
    baseline = rss_bytes(pid)
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_bytes(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    try:
        with big.open("rb") as f, httpx.Client(base_url=service.url or "", timeout=600) as http:
            response = http.post(
                "/v1/batches",
                files={"file": ("big.npz", f)},
                headers={"Authorization": f"Bearer {key}"},
            )
    finally:
        stop.set()
        sampler.join()
        big.unlink()
    seconds = time.perf_counter() - started
    if response.status_code != 201:
        raise SystemExit(f"the big upload answered {response.status_code}: {response.text[:300]}")
    return {
        "upload_mb": megabytes,
        "rss_before_mb": baseline / 2**20,
        "rss_growth_mb": (peak - baseline) / 2**20,
        "upload_mb_per_s": megabytes / seconds,
    }


def run_backend(name: str, args: argparse.Namespace, work: Path, model: Path, batch: Path) -> None:
    print(f"\n== {name} ==", flush=True)
    context = (
        sqlite_service(work)
        if name == "sqlite"
        else postgres_service(
            work, os.environ.get("GRADHEALTH_BENCH_DATABASE_URL", DEFAULT_BENCH_DB)
        )
    )
    with context as (service, key):
        try:
            measure(service, key, args, work, model, batch)
        except Exception:
            print(f"  server log (last lines):\n{chr(10).join(service.log().splitlines()[-30:])}")
            raise
        finally:
            problems = [line for line in service.log().splitlines() if "Error" in line]
            if problems:
                print(f"  server log: {len(problems)} error lines, last: {problems[-1][:300]}")


def measure(
    service: Service, key: str, args: argparse.Namespace, work: Path, model: Path, batch: Path
) -> None:
    if True:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=service.url or "", headers=headers, timeout=60) as client:
            numbers, finished_id = latency(client, model, batch, args.jobs)
        print(f"submit→report minus engine, {args.jobs} jobs, warm worker:", flush=True)
        for k, v in numbers.items():
            print(f"  {k:28s} {v:9.1f}")
        numbers = poll_latency(
            service.url or "", key, finished_id, args.clients, args.seconds, args.think_ms / 1000
        )
        print(f"status poll, {args.clients} concurrent clients polling every {args.think_ms:g} ms:")
        for k, v in numbers.items():
            print(f"  {k:28s} {v:9.2f}")
        if args.upload_mb:
            numbers = upload_memory(service, key, work, args.upload_mb)
            print("API memory during a streamed upload:")
            for k, v in numbers.items():
                print(f"  {k:28s} {v:9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--think-ms", type=float, default=1000.0, help="pause of each client between polls"
    )
    parser.add_argument("--upload-mb", type=int, default=1024)
    args = parser.parse_args()
    print(f"gradhealth service bench on {os.cpu_count()} CPU cores; torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="gradhealth-bench-") as tmp:
        work = Path(tmp)
        model, batch = tiny_files(work)
        for name in args.backends.split(","):
            run_backend(name.strip(), args, work, model, batch)


if __name__ == "__main__":
    main()
