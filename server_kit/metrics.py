"""Prometheus metrics of a server: RPC counts, latencies and codes, plus the app's own.

Every `GrpcServer` started with a metrics address owns one `ServerMetrics`: its
own `CollectorRegistry` (several servers share one process in `modelyard serve
all` and in tests, and each port must show its own server only), the
`MetricsInterceptor` that counts every RPC, and an HTTP server answering
`GET /metrics` in the Prometheus text format (OpenMetrics when asked).

RPC metrics follow go-grpc-prometheus, prefixed `modelyard_`:

- `modelyard_grpc_server_started_total{grpc_service, grpc_method, grpc_type}`
- `modelyard_grpc_server_handled_total{grpc_service, grpc_method, grpc_type, grpc_code}`
- `modelyard_grpc_server_handling_seconds{grpc_service, grpc_method, grpc_type}` (histogram)
- `modelyard_grpc_server_in_flight{grpc_service, grpc_method}` (gauge)

The app adds its own metrics (catalog sizes, job states, tokens, ...) by having
a `metrics_collectors()` method: the collectors it returns are registered in the
server's registry. Gauges that mirror state (models per state, queue depth) are
computed when Prometheus scrapes, by a `ScrapeCollector`, so nothing has to be
kept in sync.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import grpc
from google.protobuf import descriptor_pool
from grpc import aio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger("modelyard.metrics")

PREFIX = "modelyard"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
"""Handling-time buckets (seconds): sub-millisecond reads up to minutes-long streams."""

Finish = Callable[[grpc.StatusCode], None]
"""Called once when an RPC ends, with its final status code."""


def rpc_type(handler: grpc.RpcMethodHandler) -> str:
    """`unary`, `server_stream`, `client_stream` or `bidi_stream`."""
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


def split_method(full_method: str) -> tuple[str, str]:
    """`/pkg.Service/Method` -> (`pkg.Service`, `Method`)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def final_code(context: aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status an RPC ended with: the aborted or set code, else OK, CANCELLED or UNKNOWN."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def wrap_handler(
    handler: grpc.RpcMethodHandler, on_start: Callable[[aio.ServicerContext], Finish]
) -> grpc.RpcMethodHandler:
    """`handler`, calling `on_start(context)` when an RPC begins and its result when it ends.

    The wrapper runs in the RPC's task, so context variables `on_start` sets (a
    trace span) are seen by the handler. Meant for interceptors placed before
    the error interceptor: the code they see is the one the client gets.
    """
    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: aio.ServicerContext) -> Any:
            finish = on_start(context)
            error: BaseException | None = None
            try:
                result = inner(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result
            except BaseException as exc:
                error = exc
                raise
            finally:
                finish(final_code(context, error))

        make = grpc.unary_unary_rpc_method_handler
        if not handler.unary_unary:
            make = grpc.stream_unary_rpc_method_handler
        return make(unary, handler.request_deserializer, handler.response_serializer)

    inner_stream = handler.unary_stream or handler.stream_stream

    async def stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        finish = on_start(context)
        error: BaseException | None = None
        result: Any = None
        try:
            result = inner_stream(request, context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            elif inspect.isawaitable(result):
                await result
            else:
                for item in result:
                    yield item
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                # A client that cancels while a message is being sent leaves this generator
                # suspended; grpc drops it and Python closes it later. Close the inner one now,
                # so the handler (and the engine request under it) ends with this one.
                aclose = getattr(result, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                finish(final_code(context, error))

    make_stream = grpc.unary_stream_rpc_method_handler
    if not handler.unary_stream:
        make_stream = grpc.stream_stream_rpc_method_handler
    return make_stream(stream, handler.request_deserializer, handler.response_serializer)


class RpcMetrics:
    """The RPC counters, histogram and gauge of one server."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_service", "grpc_method", "grpc_type"]
        self.started = Counter(
            f"{PREFIX}_grpc_server_started_total",
            "RPCs started on the server.",
            labels,
            registry=registry,
        )
        self.handled = Counter(
            f"{PREFIX}_grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            f"{PREFIX}_grpc_server_handling_seconds",
            "Time from the start of an RPC to its status (whole stream for streaming RPCs).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_grpc_server_in_flight",
            "RPCs being handled now.",
            ["grpc_service", "grpc_method"],
            registry=registry,
        )
        self._children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}

    def initialize(self, service_names: Iterable[str]) -> None:
        """Create every method's series at zero, so rates exist before the first call."""
        pool = descriptor_pool.Default()
        for name in service_names:
            try:
                service = pool.FindServiceByName(name)
            except KeyError:
                continue
            for method in service.methods:
                if method.client_streaming:
                    kind = "bidi_stream" if method.server_streaming else "client_stream"
                else:
                    kind = "server_stream" if method.server_streaming else "unary"
                labels = (name, method.name, kind)
                self.started.labels(*labels)
                self.handled.labels(*labels, grpc.StatusCode.OK.name)
                self.handling_seconds.labels(*labels)
                self.in_flight.labels(name, method.name)

    def start(self, service: str, method: str, kind: str) -> Finish:
        """Count an RPC as started; returns what records its end."""
        key = (service, method, kind)
        children = self._children.get(key)
        if children is None:  # label lookups cost microseconds: once per method
            children = (
                self.started.labels(*key),
                self.in_flight.labels(service, method),
                self.handling_seconds.labels(*key),
            )
            self._children[key] = children
        started, in_flight, handling_seconds = children
        started.inc()
        in_flight.inc()
        began = time.perf_counter()

        def finish(code: grpc.StatusCode) -> None:
            handling_seconds.observe(time.perf_counter() - began)
            in_flight.dec()
            self.handled.labels(service, method, kind, code.name).inc()

        return finish


class MetricsInterceptor(aio.ServerInterceptor):
    """Counts every RPC of a server: starts, codes, latency, in flight."""

    def __init__(self, rpc: RpcMetrics) -> None:
        self.rpc = rpc

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = split_method(handler_call_details.method)
        kind = rpc_type(handler)
        return wrap_handler(handler, lambda _context: self.rpc.start(service, method, kind))


class ScrapeCollector(Collector):
    """A collector whose metrics a function computes at scrape time.

    A failing function (a database that is down) is logged and its metrics are
    left out of that scrape; the RPC metrics are still served.
    """

    def __init__(self, name: str, compute: Callable[[], Iterable[Metric]]) -> None:
        self.name = name
        self._compute = compute

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._compute())
        except Exception:
            log.warning("metrics %s: could not be computed for this scrape", self.name, exc_info=True)
            return []

    def describe(self) -> Iterable[Metric]:
        # Nothing up front: `collect` may need resources that exist only once the app runs.
        return []


class MetricsApp(Protocol):
    """An app that adds its own metrics to its server's registry."""

    def metrics_collectors(self) -> Sequence[Collector]:
        """Collectors to register (metric objects made with `registry=None`, `ScrapeCollector`s)."""


def bind_host(address: str) -> str:
    """`host:port` -> the host to bind an HTTP server on (`0.0.0.0` for wildcards)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    return "0.0.0.0" if host in ("", "::", "0.0.0.0", "*") else host


class ServerMetrics:
    """One server's registry, RPC interceptor and `/metrics` HTTP endpoint."""

    def __init__(self, listen: str) -> None:
        """`listen` is `host:port` of the HTTP endpoint (port 0: any free port)."""
        self.listen = listen
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.rpc = RpcMetrics(self.registry)
        self.interceptor = MetricsInterceptor(self.rpc)
        self.port = 0
        self._httpd: WSGIServer | None = None

    def add_app(self, app: object) -> None:
        """Register the app's own collectors (if it has `metrics_collectors`) and its RPC series."""
        self.rpc.initialize(getattr(app, "service_names", ()))
        collectors = getattr(app, "metrics_collectors", None)
        if collectors is None:
            return
        for collector in collectors():
            self.registry.register(collector)

    def start(self) -> int:
        """Serve `/metrics`; returns the bound port, or 0 when the port could not be bound.

        A port that cannot be bound is logged as an error and the gRPC server keeps
        serving: metrics are an aid, not a reason to refuse traffic.
        """
        host, port = bind_host(self.listen), int(self.listen.rsplit(":", 1)[1])
        try:
            self._httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            log.error("metrics: cannot listen on %s:%d (%s); serving without /metrics", host, port, exc)
            return 0
        self.port = int(self._httpd.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        """Stop the HTTP endpoint."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
