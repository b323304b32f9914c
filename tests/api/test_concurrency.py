"""Many concurrent requests against a real server with a tiny connection pool: every request
must be answered. Guards against the pool-exhaustion deadlock where requests hold a pooled
connection while waiting for a threadpool slot that threads waiting for a connection hold."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from service.api.app import create_app
from service.db.session import Database
from tests.api.conftest import Samples
from tests.api.helpers import model_and_batch
from tests.conftest import Backend, TenantKey

CLIENTS = 60
REQUESTS_PER_CLIENT = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_concurrent_polls_and_submits_with_a_tiny_pool(
    backend: Backend, tenant: TenantKey, samples: Samples
) -> None:
    settings = backend.settings.model_copy(update={"db_pool_size": 1, "auth_cache_ttl_s": 0})
    database = Database.from_settings(settings)  # pool of 1 + 1 overflow
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, database=database), port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with httpx.Client(base_url=base, headers=tenant.headers) as client:
            model_id, batch_id = model_and_batch(client, samples.onnx, samples.npz)  # type: ignore[arg-type]
            first = client.post(
                "/v1/diagnoses", json={"model_id": model_id, "batch_id": batch_id}
            ).json()["id"]

        async def one_client(c: httpx.AsyncClient, i: int) -> list[int]:
            codes = []
            for _ in range(REQUESTS_PER_CLIENT):
                if i % 4 == 0:
                    r = await c.post(
                        "/v1/diagnoses", json={"model_id": model_id, "batch_id": batch_id}
                    )
                else:
                    r = await c.get(f"/v1/diagnoses/{first}")
                codes.append(r.status_code)
            return codes

        async def run_all() -> list[int]:
            limits = httpx.Limits(max_connections=CLIENTS)
            async with httpx.AsyncClient(
                base_url=base, headers=tenant.headers, limits=limits, timeout=25
            ) as c:
                results = await asyncio.gather(*(one_client(c, i) for i in range(CLIENTS)))
            return [code for codes in results for code in codes]

        codes = asyncio.run(run_all())
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        database.dispose()
    assert sorted(set(codes)) == [200, 202]
    assert len(codes) == CLIENTS * REQUESTS_PER_CLIENT
