"""Prometheus metrics: request counts and latencies per route template, and the queue's
depth by kind and status (read from the database at scrape time, so every API replica reports
the same numbers). One registry per app, so several apps in one process (tests) do not clash."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db.repositories import diagnoses as diagnoses_repo
from service.db.session import Database

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class QueueCollector(Collector):
    def __init__(self, database: Database) -> None:
        self.database = database

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "gradhealth_jobs",
            "queued and running jobs by kind (diagnose | inspect) and status",
            labels=["kind", "status"],
        )
        with self.database.session(read_only=True) as session:
            counts = diagnoses_repo.count_active(session)
        for kind in (diagnoses_repo.KIND_DIAGNOSE, diagnoses_repo.KIND_INSPECT):
            for status in diagnoses_repo.ACTIVE_STATUSES:
                family.add_metric([kind, status], counts.get((kind, status), 0))
        yield family


class Metrics:
    def __init__(self, database: Database) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gradhealth_http_requests",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gradhealth_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(QueueCollector(database))


class MetricsMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware): streamed uploads pass through untouched."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
