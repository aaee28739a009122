"""Prometheus metrics: request latency and counts per route, time per retrieval stage, index size.

Each app gets its own registry, so two apps in one process (tests) never share counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from app.api.schemas import IndexState

# Latency buckets from 5 ms (a cached page) to 30 s (a big upload on a busy CPU).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGES = ("decode", "extract", "encode", "stage1", "rerank", "ingest")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "artalign_http_request_duration_seconds", "Time to answer a request, by route",
            ["method", "route"], buckets=BUCKETS, registry=self.registry,
        )
        self.requests = Counter(
            "artalign_http_requests", "Requests answered, by route and status",
            ["method", "route", "status"], registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "artalign_stage_duration_seconds",
            "Time spent in one stage of a request: decode, extract (region extractor), encode, "
            "stage1 (FAISS candidates), rerank (cross attention), ingest",
            ["stage"], buckets=BUCKETS, registry=self.registry,
        )
        self.index_size = Gauge(
            "artalign_index_size", "Vectors in a FAISS index", ["index"], registry=self.registry
        )
        self.index_log = Gauge(
            "artalign_index_log_position",
            "Change-log positions: the one the indexes reflect (applied) and the database's "
            "newest (latest)", ["which"], registry=self.registry,
        )
        self.index_lag_changes = Gauge(
            "artalign_index_lag_changes", "Committed changes the indexes have not applied yet",
            registry=self.registry,
        )
        self.index_lag_seconds = Gauge(
            "artalign_index_lag_seconds",
            "Age of the oldest committed change the indexes have not applied; 0 when caught up",
            registry=self.registry,
        )
        self.inflight = Gauge(
            "artalign_inference_inflight", "Inference calls running now", registry=self.registry
        )

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(name).observe(time.perf_counter() - start)

    def observe_stages(self, timings: dict[str, float]) -> None:
        """Record stage times measured elsewhere (the retrieval engine reports its own)."""
        for name, seconds in timings.items():
            self.stage_seconds.labels(name).observe(seconds)

    def track_index(self, name: str, size: Callable[[], int]) -> None:
        """Read the index size when Prometheus scrapes, so it is never stale."""
        self.index_size.labels(name).set_function(size)

    def observe_index(self, state: IndexState | None) -> None:
        """Set the change-log gauges from ``state`` (NaN when the database could not be read:
        no stale value passes for a fresh one)."""
        nan = float("nan")
        self.index_log.labels("applied").set(state.position if state else nan)
        self.index_log.labels("latest").set(state.latest_position if state else nan)
        self.index_lag_changes.set(state.lag_changes if state else nan)
        self.index_lag_seconds.set(state.lag_seconds if state else nan)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Times every HTTP request and labels it with its route template (not the raw path, whose
    ids would make one time series per artwork)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.request_seconds.labels(method, template).observe(
                time.perf_counter() - start
            )
            self.metrics.requests.labels(method, template, str(status)).inc()
