"""Prometheus metrics of the server: requests by route, latency, batch sizes, refused inputs."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from alexops.serving.model import LoadedModel

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """Prometheus metrics in a registry of the app's own, so two apps in one process never clash."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "alexops_http_requests", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "alexops_http_request_duration_seconds", "request latency", ["route"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "alexops_http_errors", "responses with status ≥ 400", ["route", "status"], registry=r
        )
        self.rejected = Counter(
            "alexops_rejected_inputs", "inputs refused, by reason", ["reason"], registry=r
        )
        self.batch_size = Histogram(
            "alexops_batch_size", "inputs per onnxruntime call", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_failures = Counter(
            "alexops_inference_failures", "onnxruntime calls that raised", registry=r
        )
        self.reloads = Counter("alexops_model_reloads", "model swaps after the alias moved", registry=r)
        self.reload_failures = Counter(
            "alexops_model_reload_failures", "failed alias checks or loads", registry=r
        )
        self.model_info = Gauge(
            "alexops_model_info",
            "the model being served (value 1)",
            ["name", "version", "provider"],
            registry=r,
        )

    def serving(self, model: LoadedModel) -> None:
        self.model_info.clear()
        self.model_info.labels(model.name, str(model.version), model.provider).set(1)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, str(status)).inc()


class MetricsMiddleware:
    """Counts and times every request by its route template (unknown paths: `unmatched`)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before it starts a response

        async def send_and_record_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            self.metrics.observe(label, scope["method"], status, time.perf_counter() - started)
