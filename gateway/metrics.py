"""The gateway's Prometheus metrics, and the middleware that records them.

`GatewayMetrics` is the registry `GET /metrics` answers: HTTP requests, latency (streams
included), requests in flight, time to first token. `ObserveMiddleware` wraps every HTTP
request: it sets the request id (a valid `x-request-id` header, else a new one; echoed in
the response and logged with `server_kit.logs`), counts and times the request under its
route (`ROUTES`, else `other`) and, with tracing on, opens a server span from the caller's
trace context. It is pure ASGI, so streamed responses stay cancellable.
"""

from __future__ import annotations

import re
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server_kit import tracing
from server_kit.interceptors import REQUEST_ID_KEY
from server_kit.logs import request_id_var
from server_kit.metrics import LATENCY_BUCKETS, PREFIX

REQUEST_ID_HEADER = REQUEST_ID_KEY
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/health", "/metrics")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class GatewayMetrics:
    """The gateway's Prometheus registry: HTTP requests, latency, in-flight, time to first token."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{PREFIX}_http_requests_total",
            "HTTP requests answered by the gateway",
            ["handler", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time from request to the end of the response (streams included)",
            ["handler", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_http_requests_in_flight",
            "HTTP requests being answered",
            ["handler"],
            registry=self.registry,
        )
        self.first_token = Histogram(
            f"{PREFIX}_gateway_time_to_first_token_seconds",
            "Time from request to the first streamed delta",
            ["handler"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_first_token(self, handler: str, started: float) -> None:
        """Record the time to first token of a stream `handler` started at `started` (perf_counter)."""
        self.first_token.labels(handler).observe(time.perf_counter() - started)


def _handler(path: str) -> str:
    for route in ROUTES:
        if path == route or path.startswith(route + "/"):
            return route
    return "other"


class ObserveMiddleware:
    """Pure ASGI middleware (streams stay cancellable): request id, metrics, a server span."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        given = headers.get(REQUEST_ID_HEADER, "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        handler, method = _handler(scope["path"]), scope["method"]
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER.encode(), request_id.encode()),
                ]
            await send(message)

        self.metrics.in_flight.labels(handler).inc()
        try:
            if tracing.enabled():
                from opentelemetry import propagate, trace

                span = tracing.tracer().start_span(
                    f"{method} {handler}",
                    context=propagate.extract(headers),
                    kind=trace.SpanKind.SERVER,
                    attributes={"http.request.method": method, "url.path": scope["path"]},
                )
                with trace.use_span(span, end_on_exit=True):
                    await self.app(scope, receive, send_with_id)
                    span.set_attribute("http.response.status_code", status)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.labels(handler).dec()
            self.metrics.requests.labels(handler, method, str(status)).inc()
            self.metrics.latency.labels(handler, method).observe(time.perf_counter() - started)
            request_id_var.reset(token)
