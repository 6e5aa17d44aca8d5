"""`GatewayServer`: the gateway app on uvicorn, in the caller's event loop.

It starts and stops like a `server_kit.server.GrpcServer` (`await start()` returns the
bound port, `await stop()` drains), so `modelyard serve all` runs it in the same asyncio
process as the gRPC servers; signals stay with `server_kit.server.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterator, Sequence

import uvicorn

from clients.catalog import SERVICE as CATALOG_SERVICE
from clients.catalog import AsyncCatalogClient
from clients.channel import open_aio_channel
from clients.routing import AsyncRoutedInferenceClient
from gateway.app import create_app
from gateway.settings import GatewaySettings
from server_kit import logs, tracing
from server_kit.common import CommonSettings
from server_kit.server import GrpcServer, run

log = logging.getLogger("modelyard.gateway")


class GatewayStartError(OSError):
    """The gateway could not listen on its address."""


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers (the process's runner owns them)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayServer:
    """The gateway over the catalog at `settings.catalog_address`, on `settings.address`."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.port = 0
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self._catalog: AsyncCatalogClient | None = None
        self._inference: AsyncRoutedInferenceClient | None = None

    async def start(self) -> int:
        """Open the clients, bind and serve; returns the bound port (useful with port 0)."""
        settings = self.settings
        tls = settings.client_tls()
        channel = open_aio_channel(settings.catalog_address, CATALOG_SERVICE, tls)
        self._catalog = AsyncCatalogClient(settings.catalog_address, tls=tls, channel=channel)
        self._inference = AsyncRoutedInferenceClient(
            self._catalog,
            refresh_seconds=settings.route_refresh_seconds,
            tls=tls,
            timeout=settings.request_timeout,
        )
        app = create_app(
            self._catalog,
            self._inference,
            trust_request_chat_template=settings.trust_request_chat_template,
            request_timeout=settings.request_timeout,
        )
        host, port = settings.address.rsplit(":", 1)
        ssl_options: dict[str, object] = {}
        if settings.tls_cert and settings.tls_key:
            ssl_options = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
            if settings.tls_client_ca:
                ssl_options["ssl_ca_certs"] = str(settings.tls_client_ca)
                ssl_options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        config = uvicorn.Config(
            app,
            host=host.strip("[]") or "0.0.0.0",
            port=int(port),
            log_config=None,  # the process's logging (server_kit.logs)
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(settings.grace_seconds),
            **ssl_options,  # type: ignore[arg-type]
        )
        self._server = _Uvicorn(config)
        self._task = asyncio.create_task(self._server.serve(), name="gateway")
        while not self._server.started:
            if self._task.done():  # uvicorn logged why (a port in use) and exited
                with contextlib.suppress(SystemExit):
                    await self._task
                await self.stop()
                raise GatewayStartError(f"gateway: cannot listen on {settings.address}")
            await asyncio.sleep(0.01)
        self.port = int(self._server.servers[0].sockets[0].getsockname()[1])
        scheme = "https" if ssl_options else "http"
        log.info("gateway on %s://%s:%d/v1 (catalog %s)", scheme, host, self.port, settings.catalog_address)
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (grace seconds), close the clients."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inference is not None:
            await self._inference.close()
        if self._catalog is not None:
            await self._catalog.close()
        self._server = self._task = self._inference = self._catalog = None


async def run_with_gateway(servers: Sequence[GrpcServer], gateway: GatewaySettings) -> None:
    """Start the gateway, then run `servers` (`server_kit.server.run`: until SIGTERM/SIGINT).

    With gRPC servers beside it, a gateway that cannot listen is logged and the gRPC
    servers serve without it (as they do without /metrics); alone, it exits with 1.
    """
    server = GatewayServer(gateway)
    try:
        await server.start()
    except GatewayStartError as error:
        if not servers:
            log.error("%s", error)
            raise SystemExit(1) from None
        log.error("%s; serving gRPC without the gateway", error)
    try:
        await run(servers)
    finally:
        await server.stop()


def serve_forever(servers: Sequence[GrpcServer], gateway: GatewaySettings, common: CommonSettings) -> None:
    """`server_kit.common.serve_forever` with the gateway too: logging, tracing, run."""
    logs.configure(common.log_level, common.log_format)
    names = [name for server in servers for name in server.app.service_names]
    tracing.configure(common.otel_exporter, tracing.service_name_of(names) if names else "modelyard-gateway")
    asyncio.run(run_with_gateway(servers, gateway))
