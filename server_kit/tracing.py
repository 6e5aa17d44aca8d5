"""OpenTelemetry tracing through gRPC metadata, off unless configured.

`configure(exporter, service_name)` (from `MODELYARD_OTEL_EXPORTER`: `none`,
`console` or `otlp`) installs an SDK tracer provider; the standard `OTEL_*`
variables configure the rest (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_PROPAGATORS`, ...).

Once tracing is on:

- `TracingInterceptor` (server) reads the W3C `traceparent` from the call's
  metadata and runs each RPC in a SERVER span named `pkg.Service/Method`, current
  while the handler runs;
- the client interceptors (`client_interceptors()`, `aio_client_interceptors()`,
  installed by `clients.channel` on the channels it opens) run each call in a
  CLIENT span, child of the current span, and send its context as `traceparent`
  metadata, so a service-to-service call (inference -> catalog `GetModel`)
  continues the caller's trace.

With tracing off no interceptor is installed: nothing is spent per call.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

import server_kit
from server_kit.interceptors import REQUEST_ID_KEY
from server_kit.metrics import Finish, split_method, wrap_handler

EXPORTERS = ("none", "console", "otlp")

UNTRACED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
"""Probes and reflection: called often, of no interest in a trace."""

SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
"""Codes that mark a SERVER span as an error (OpenTelemetry's gRPC conventions);
a client span is an error for every code but OK."""

_provider: trace.TracerProvider | None = None
_tracers: dict[int, trace.Tracer] = {}


def install(provider: trace.TracerProvider | None) -> None:
    """Use `provider` for Modelyard's spans (None: fall back to the global provider).

    `configure` calls it; tests call it with a provider of their own, since the
    global provider can be set only once per process.
    """
    global _provider
    _provider = provider
    _tracers.clear()


def enabled() -> bool:
    """True when spans are recorded: `install`ed, or an SDK provider set globally."""
    if _provider is not None:
        return True
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def tracer() -> trace.Tracer:
    """Modelyard's tracer on the active provider."""
    provider = _provider or trace.get_tracer_provider()
    found = _tracers.get(id(provider))
    if found is None:
        found = provider.get_tracer("modelyard", server_kit.__version__)
        _tracers[id(provider)] = found
    return found


def configure(exporter: str, service_name: str) -> None:
    """Install an SDK tracer provider exporting to `exporter` (`none`: leave tracing off).

    `service_name` is the resource's `service.name` unless `OTEL_SERVICE_NAME` (or
    `OTEL_RESOURCE_ATTRIBUTES`) sets one. Spans are batched; the provider flushes
    them at exit.
    """
    exporter = exporter.strip().lower() or "none"
    if exporter not in EXPORTERS:
        raise ValueError(f"MODELYARD_OTEL_EXPORTER: expected one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if exporter == "none":
        return
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    attributes: dict[str, Any] = {}
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes[SERVICE_NAME] = service_name
    span_exporter: SpanExporter
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter()
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    install(provider)


def service_name_of(service_names: Sequence[str]) -> str:
    """`modelyard-catalog` for `modelyard.catalog.v1.CatalogService`; `modelyard` for several services."""
    parts = {name.split(".")[1] for name in service_names if name.count(".") >= 2}
    return f"modelyard-{parts.pop()}" if len(parts) == 1 else "modelyard"


def _end(span: trace.Span, code: grpc.StatusCode, *, server: bool) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK and (not server or code in SERVER_ERROR_CODES):
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


def _rpc_attributes(full_method: str) -> dict[str, Any]:
    service, method = split_method(full_method)
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


# ---------------------------------------------------------------- server


class TracingInterceptor(aio.ServerInterceptor):
    """Runs each RPC in a SERVER span continuing the caller's `traceparent`."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(UNTRACED_PREFIXES):
            return handler
        attributes = _rpc_attributes(method)
        name = method.lstrip("/")

        def on_start(context: aio.ServicerContext) -> Finish:
            carrier: dict[str, str] = {}
            for key, value in context.invocation_metadata() or ():
                if isinstance(value, str):
                    carrier[key] = value
            parent = propagate.extract(carrier)
            span = tracer().start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
            if REQUEST_ID_KEY in carrier:
                span.set_attribute("modelyard.request_id", carrier[REQUEST_ID_KEY][:128])
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            task = asyncio.current_task()

            def finish(code: grpc.StatusCode) -> None:
                # A stream abandoned by a cancelled RPC is closed later from another task,
                # whose context never held the span: nothing to detach there.
                if asyncio.current_task() is task:
                    otel_context.detach(token)
                _end(span, code, server=True)

            return finish

        return wrap_handler(handler, on_start)


def server_interceptors() -> list[aio.ServerInterceptor]:
    """The tracing interceptor when tracing is on, else none."""
    return [TracingInterceptor()] if enabled() else []


# ---------------------------------------------------------------- clients


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    """Call details with new metadata (grpc offers no public constructor for the sync ones)."""


def _start_client_span(method: str, metadata: Any) -> tuple[trace.Span, list[tuple[str, Any]]]:
    """A CLIENT span for `method`, and `metadata` plus the span's `traceparent`."""
    span = tracer().start_span(method.lstrip("/"), kind=SpanKind.CLIENT, attributes=_rpc_attributes(method))
    items = list(metadata or ())
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    items.extend(carrier.items())
    return span, items


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


class ClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Sync channels: a CLIENT span per call, its context sent as `traceparent`."""

    def _intercept(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        span, metadata = _start_client_span(_method_name(details.method), details.metadata)
        new_details = _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            getattr(details, "compression", None),
        )
        try:
            outcome = continuation(new_details, request)
        except BaseException:
            _end(span, grpc.StatusCode.UNKNOWN, server=False)
            raise
        # Unary: already complete (the callback runs now); streams: when the stream ends.
        outcome.add_done_callback(lambda call: _end(span, call.code(), server=False))
        return outcome

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return self._intercept(continuation, client_call_details, request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return self._intercept(continuation, client_call_details, request)


def _aio_details(details: aio.ClientCallDetails) -> tuple[trace.Span, aio.ClientCallDetails]:
    span, items = _start_client_span(_method_name(details.method), details.metadata)
    metadata = aio.Metadata(*items)
    new_details = aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )
    return span, new_details


def _code_of(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, grpc.RpcError):
        return error.code()
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class AioUnaryUnaryInterceptor(aio.UnaryUnaryClientInterceptor):
    """Asyncio channels, unary calls: a CLIENT span per call, its context sent as `traceparent`."""

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        span, details = _aio_details(client_call_details)
        try:
            call = await continuation(details, request)
            code = await call.code()
        except BaseException as error:
            _end(span, _code_of(error), server=False)
            raise
        _end(span, code, server=False)
        return call


_pending_ends: set[asyncio.Task[None]] = set()


async def _end_when_done(span: trace.Span, call: Any) -> None:
    try:
        code = await call.code()
    except BaseException as error:
        code = _code_of(error)
    _end(span, code, server=False)


class AioUnaryStreamInterceptor(aio.UnaryStreamClientInterceptor):
    """Asyncio channels, server-streaming calls: the span ends with the stream."""

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        span, details = _aio_details(client_call_details)
        try:
            call = await continuation(details, request)
        except BaseException as error:
            _end(span, _code_of(error), server=False)
            raise
        task = asyncio.ensure_future(_end_when_done(span, call))
        _pending_ends.add(task)
        task.add_done_callback(_pending_ends.discard)
        return call


def client_interceptors() -> list[grpc.UnaryUnaryClientInterceptor | grpc.UnaryStreamClientInterceptor]:
    """Interceptors for a sync channel: the tracing one when tracing is on, else none."""
    return [ClientInterceptor()] if enabled() else []


def aio_client_interceptors() -> list[aio.ClientInterceptor]:
    """Interceptors for an asyncio channel: the tracing ones when tracing is on, else none."""
    return [AioUnaryUnaryInterceptor(), AioUnaryStreamInterceptor()] if enabled() else []
