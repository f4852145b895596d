"""Prometheus metrics for the server (`GET /metrics`), in a registry of the app's own so that
several apps in one process (tests) do not collide."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Requests, errors, per-stage latency, queue depth, batch sizes, tokens, scene-cache results."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "uhrbat_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.errors = Counter("uhrbat_errors", "Error responses by OpenAI error type", ["type"], registry=r)
        self.request_seconds = Histogram(
            "uhrbat_request_seconds", "Wall time of an HTTP request", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.stage_seconds = Histogram(
            "uhrbat_stage_seconds",
            "Pipeline stage time per request (queue = waiting)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("uhrbat_queue_depth", "Requests waiting for the model", registry=r)
        self.batch_size = Histogram(
            "uhrbat_batch_size", "Requests per model batch", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r
        )
        self.tokens = Counter("uhrbat_tokens", "Prompt and completion tokens", ["kind"], registry=r)
        self.scene_cache = Counter(
            "uhrbat_scene_cache", "Scene-cache results (off | miss | hit | disk)", ["result"], registry=r
        )

    def observe_result(self, res: Any, queued_s: float) -> None:
        self.stage_seconds.labels("queue").observe(queued_s)
        for stage, seconds in (res.timings or {}).items():
            self.stage_seconds.labels(stage).observe(float(seconds))
        self.tokens.labels("prompt").inc(res.prompt_tokens)
        self.tokens.labels("completion").inc(res.completion_tokens)
        self.scene_cache.labels(res.cache).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware counting requests and their latency by route (streaming-safe)."""

    def __init__(self, app: Any, metrics: Metrics, routes: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _route(self, path: str) -> str:
        if path in self.routes:
            return path
        if path.startswith("/api/result/"):
            return "/api/result"
        if path.startswith("/v1/scenes/"):  # never a label per scene id
            return "/v1/scenes/{id}"
        return "other"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        import time

        route = self._route(scope.get("path", ""))
        status = {"code": 500}
        t0 = time.perf_counter()

        async def _send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - t0)


__all__ = ["Metrics", "MetricsMiddleware"]
