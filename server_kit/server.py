"""asyncio gRPC server bootstrap shared by the three services.

A service is a `ServiceApp`: it opens its resources in `start()`, adds its
servicer to a server in `add_to_server()`, and releases everything in
`stop()`. `GrpcServer` runs one app on one address with:

- `grpc.health.v1.Health`, reporting SERVING for the overall server and for
  each of the app's services once started;
- server reflection for the app's services and health;
- the error/request-id interceptor first, then any others (e.g. security), so
  errors those raise are mapped too;
- TLS when given credentials (a warning at start when plaintext);
- bounded message sizes;
- Prometheus metrics on their own HTTP port, and tracing when configured
  (`server_kit.metrics`, `server_kit.tracing`);
- graceful shutdown: health NOT_SERVING first, then `server.stop(grace)`
  lets in-flight RPCs finish, then the app stops.

`run()` starts one or more servers in one event loop and stops them all on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from typing import Any, Protocol

import grpc
from google.protobuf import descriptor_pool
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server_kit import errors, tracing
from server_kit.interceptors import ErrorInterceptor, MalformedRequestInterceptor
from server_kit.metrics import ServerMetrics
from server_kit.security import SecurityInterceptor

log = logging.getLogger("modelyard.server")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ServiceApp(Protocol):
    """What a service gives the kit.

    An app may also define `use_health(servicer)`: it is given the server's health
    servicer before the server starts, to report its own health later; and
    `metrics_collectors()`: Prometheus collectors added to the server's registry
    when metrics are on (`server_kit.metrics`).
    """

    @property
    def service_names(self) -> Sequence[str]:
        """Full names of the gRPC services served, e.g. `modelyard.catalog.v1.CatalogService`."""

    async def start(self) -> None:
        """Open resources (database, engine); called before the port serves."""

    def add_to_server(self, server: aio.Server) -> None:
        """Register the app's servicers on `server`."""

    async def on_serving(self, port: int) -> None:
        """Called once the server answers on `port` (e.g. to register with the catalog)."""

    async def stop(self) -> None:
        """Release resources; called after the server has drained."""


class SymbolPool:
    """The descriptor pool reflection answers from, resolving method and field symbols too.

    protobuf's pool finds the file of a service, message or enum, not of
    `pkg.Service.Method` or `pkg.Message.field`; `grpcurl describe Service.Method`
    asks exactly that. Everything else is the wrapped pool's.
    """

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        """The file defining `symbol`: a type, or a method, field or enum value of one."""
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            parent, _, member = symbol.rpartition(".")
            if parent and member:
                for find, members in (
                    (self._pool.FindServiceByName, "methods_by_name"),
                    (self._pool.FindMessageTypeByName, "fields_by_name"),
                    (self._pool.FindEnumTypeByName, "values_by_name"),
                ):
                    try:
                        owner = find(parent)
                    except KeyError:
                        continue
                    if member in getattr(owner, members):
                        return owner.file
            raise


class GrpcServer:
    """One app on one address, with health, reflection and graceful shutdown."""

    def __init__(
        self,
        app: ServiceApp,
        address: str,
        *,
        grace_seconds: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        interceptors: Sequence[aio.ServerInterceptor] = (),
        credentials: grpc.ServerCredentials | None = None,
        max_concurrent_rpcs: int | None = None,
        drain_seconds: float = 0.0,
        metrics_listen: str | None = None,
    ) -> None:
        self.app = app
        self.address = address
        self.grace_seconds = grace_seconds
        self.drain_seconds = drain_seconds
        self.health = health.aio.HealthServicer()
        # The first interceptor wraps the others: the ErrorInterceptor goes first so that
        # errors raised by later ones (auth: UNAUTHENTICATED, PERMISSION_DENIED) are mapped too.
        # MalformedRequestInterceptor goes last (innermost): a body that does not parse is
        # refused only after authentication, so a caller without a token learns nothing.
        self._interceptors = [ErrorInterceptor(), *interceptors, MalformedRequestInterceptor()]
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self._max_concurrent_rpcs = max_concurrent_rpcs
        self._server: aio.Server | None = None
        self._credentials = credentials
        self.port = 0
        self._stopped = asyncio.Event()
        # Prometheus metrics on `metrics_listen` (`host:port`, port 0: any free port); None: off.
        self.metrics = ServerMetrics(metrics_listen) if metrics_listen else None

    async def start(self) -> int:
        """Start the app, bind, serve; returns the bound port (useful with port 0)."""
        # The aio server binds to the running loop, so it is made here.
        # Tracing and metrics wrap all others: they see the status code the client gets.
        observers = [*tracing.server_interceptors(), *([self.metrics.interceptor] if self.metrics else [])]
        self._server = aio.server(
            interceptors=[*observers, *self._interceptors],
            options=self._options,
            maximum_concurrent_rpcs=self._max_concurrent_rpcs,
        )
        await self.app.start()
        self.app.add_to_server(self._server)
        if self.metrics is not None:
            self.metrics.add_app(self.app)
        use_health = getattr(self.app, "use_health", None)
        if use_health is not None:  # optional: apps that report their own health (a dead engine)
            use_health(self.health)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = [*self.app.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self._server, pool=SymbolPool(descriptor_pool.Default()))
        if self._credentials is not None:
            self.port = self._server.add_secure_port(self.address, self._credentials)
        else:
            self.port = self._server.add_insecure_port(self.address)
        await self._server.start()
        if self.metrics is not None:
            self.metrics.start()
        for name in ["", *self.app.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self.app.on_serving(self.port)
        log.info("serving %s on %s (port %d)", ", ".join(self.app.service_names), self.address, self.port)
        self._log_security()
        return self.port

    def _log_security(self) -> None:
        if self._credentials is None:
            log.warning(
                "%s is PLAINTEXT: set MODELYARD_TLS_CERT and MODELYARD_TLS_KEY to serve TLS", self.address
            )
        else:
            log.info("%s serves TLS", self.address)
        for interceptor in self._interceptors:
            if isinstance(interceptor, SecurityInterceptor):
                interceptor.log_status(self.address)

    async def stop(self, grace: float | None = None) -> None:
        """Stop gracefully.

        Health turns NOT_SERVING at once and the server keeps answering for
        `drain_seconds` (so load balancers and probes see it), then refuses new
        RPCs and gives in-flight ones `grace` seconds, then the app stops.
        """
        if self._stopped.is_set() or self._server is None:
            return
        self._stopped.set()
        grace = self.grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.drain_seconds > 0:
            await asyncio.sleep(self.drain_seconds)
        log.info("draining %s for up to %.1f s", ", ".join(self.app.service_names), grace)
        await self._server.stop(grace)
        await self.app.stop()
        if self.metrics is not None:
            self.metrics.stop()
        log.info("stopped %s", ", ".join(self.app.service_names))

    @property
    def target(self) -> str:
        """`host:port` a local client dials (the bound port, on loopback for wildcard hosts)."""
        host = self.address.rsplit(":", 1)[0]
        if host in ("[::]", "0.0.0.0", ""):
            host = "localhost"
        return f"{host}:{self.port}"

    async def wait_for_termination(self) -> None:
        """Return when the server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()


async def run(servers: Sequence[GrpcServer]) -> None:
    """Start `servers`, then stop them all gracefully on SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started: list[GrpcServer] = []
    try:
        for server in servers:
            try:
                await server.start()
            except errors.ModelyardError as error:  # a dependency is down or a setting is wrong
                names = ", ".join(server.app.service_names)
                log.error("cannot start %s: %s [%s] %s", names, error.message, error.reason, error.metadata)
                raise SystemExit(1) from None
            started.append(server)
        await stop.wait()
        log.info("shutdown requested")
    finally:
        await asyncio.gather(*(server.stop() for server in reversed(started)))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
