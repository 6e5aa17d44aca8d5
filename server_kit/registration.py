"""Worker registration with the catalog: register, heartbeat, deregister.

Trainer and inference servers run one `WorkerRegistration` when a catalog
address is configured. It registers the worker's description at start-up,
heartbeats every TTL/3 with the current load, free memory and loaded models,
re-registers when the catalog forgot the worker (a restarted catalog), keeps
trying while the catalog is down (the worker goes on serving), and
deregisters on shutdown. It calls the catalog with the service's own token
(`MODELYARD_SERVICE_TOKEN`, role `worker`) and TLS settings; a catalog that
refuses them is logged as an error naming the setting to fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc

from clients.catalog import AsyncCatalogClient
from clients.channel import TlsConfig
from clients.errors import ModelyardRpcError
from modelyard.catalog.v1 import catalog_service_pb2, worker_pb2

log = logging.getLogger("modelyard.registration")

_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class WorkerRegistration:
    """Keeps one worker registered with the catalog while the server runs."""

    def __init__(
        self,
        catalog_address: str,
        worker_id: str,
        describe: Callable[[], worker_pb2.Worker],
        heartbeat: Callable[[], catalog_service_pb2.HeartbeatRequest],
        *,
        token: str | None = None,
        tls: TlsConfig | None = None,
        retry_seconds: float = 2.0,
    ) -> None:
        self.catalog_address = catalog_address
        self.worker_id = worker_id
        self._describe = describe
        self._heartbeat = heartbeat
        self._client = AsyncCatalogClient(catalog_address, timeout=5.0, token=token, tls=tls)
        self._retry_seconds = retry_seconds
        self._interval = 10.0
        self._task: asyncio.Task[None] | None = None
        self.registered = asyncio.Event()

    @property
    def name(self) -> str:
        """`workers/{id}`."""
        return f"workers/{self.worker_id}"

    async def start(self) -> None:
        """Try to register once now, then keep registered in the background."""
        try:
            await self._register()
        except ModelyardRpcError as error:
            self._log_failure(error)
        self._task = asyncio.create_task(self._loop(), name=f"registration-{self.worker_id}")

    async def _register(self) -> None:
        reply = await self._client.register_worker(self.worker_id, self._describe())
        ttl = reply.heartbeat_ttl_seconds or 30
        self._interval = max(ttl / 3.0, 0.2)
        self.registered.set()
        log.info("registered %s with the catalog at %s (ttl %s s)", self.name, self.catalog_address, ttl)

    async def beat(self) -> None:
        """Send one heartbeat now (re-registering when the catalog does not know the worker)."""
        request = self._heartbeat()
        request.name = self.name
        try:
            await self._client.heartbeat(request)
        except ModelyardRpcError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                raise
            self.registered.clear()
            await self._register()
            await self._client.heartbeat(request)  # its load and loaded models, without waiting a beat

    async def _loop(self) -> None:
        while True:
            try:
                if not self.registered.is_set():
                    await self._register()
                else:
                    await self.beat()
                await asyncio.sleep(self._interval)
            except asyncio.CancelledError:
                raise
            except ModelyardRpcError as error:
                self._log_failure(error)
                await asyncio.sleep(self._retry_seconds)

    def _log_failure(self, error: ModelyardRpcError) -> None:
        if error.code in _REFUSED:
            log.error(
                "the catalog at %s refuses %s: %s; set MODELYARD_SERVICE_TOKEN to a token with the "
                "worker role; retrying",
                self.catalog_address,
                self.name,
                error,
            )
        else:
            log.warning("catalog at %s: %s; retrying", self.catalog_address, error.code.name)

    async def stop(self) -> None:
        """Stop heartbeating and deregister (best effort)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.registered.is_set():
            try:
                await self._client.deregister_worker(self.worker_id)
                log.info("deregistered %s", self.name)
            except ModelyardRpcError as error:
                log.warning("could not deregister %s: %s", self.name, error.code.name)
        await self._client.close()
