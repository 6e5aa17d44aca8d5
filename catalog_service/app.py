"""The catalog as a `ServiceApp`: store, import flow and servicer wired together."""

from __future__ import annotations

import asyncio
import logging

from grpc import aio
from grpc_health.v1 import health, health_pb2
from prometheus_client.registry import Collector

from catalog_service.catalog import Catalog
from catalog_service.db import migrate
from catalog_service.metrics import catalog_collector
from catalog_service.servicer import CatalogServicer
from catalog_service.settings import CatalogSettings
from catalog_service.store import CatalogStore
from catalog_service.warmup import warm_up
from modelyard.catalog.v1 import catalog_service_pb2, catalog_service_pb2_grpc
from server_kit.database import watch_database

SERVICE_NAME = catalog_service_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name

log = logging.getLogger("modelyard.catalog")


class CatalogApp:
    """Opens the catalog's store and serves `modelyard.catalog.v1.CatalogService`."""

    service_names = (SERVICE_NAME,)

    def __init__(self, settings: CatalogSettings) -> None:
        self.settings = settings
        self.store: CatalogStore | None = None
        self.catalog: Catalog | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._database_watch: asyncio.Task[None] | None = None
        self._warmup: asyncio.Task[None] | None = None
        self._warm = False
        self._database_answers = True
        self._health: health.aio.HealthServicer | None = None

    async def start(self) -> None:
        # The import flow's lazy imports load meanwhile; the service is ready once they have.
        self._warmup = asyncio.create_task(self._warm_up(), name="warm-up-imports")
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        url = self.settings.resolved_database_url()
        await asyncio.to_thread(migrate, url)
        self.store = CatalogStore(url, heartbeat_ttl=self.settings.heartbeat_ttl_seconds)
        interrupted = await asyncio.to_thread(self.store.fail_unfinished_imports)
        if interrupted:
            log.warning("marked %d interrupted imports FAILED: %s", len(interrupted), ", ".join(interrupted))
        self.catalog = Catalog(self.store, self.settings)

    def add_to_server(self, server: aio.Server) -> None:
        assert self.catalog is not None, "start() first"
        catalog_service_pb2_grpc.add_CatalogServiceServicer_to_server(CatalogServicer(self.catalog), server)

    def metrics_collectors(self) -> list[Collector]:
        """Models per kind and state, workers per role and state (`catalog_service.metrics`)."""
        return [catalog_collector(lambda: self.store)]

    def use_health(self, servicer: health.aio.HealthServicer) -> None:
        """The server's health servicer: the catalog service is NOT_SERVING while its
        database does not answer, and until the import flow is warm (`warmup`: a few
        seconds after start). The server's own entry, ``""``, stays SERVING: the process
        works, and restarting it would not bring the database back."""
        self._health = servicer

    async def _report_health(self) -> None:
        if self._health is not None:
            ready = self._warm and self._database_answers
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ready
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await self._health.set(SERVICE_NAME, status)

    async def on_serving(self, port: int) -> None:
        self._sweeper = asyncio.create_task(self._sweep_workers(), name="sweep-workers")
        self._database_watch = asyncio.create_task(self._watch_database(), name="watch-database")
        if not self._warm:
            await self._report_health()

    async def _warm_up(self) -> None:
        """Pay the import flow's lazy imports now, not on the first ImportModel (`warmup`)."""
        seconds = await asyncio.to_thread(warm_up)
        log.info("import flow warmed up in %.1f s", seconds)
        self._warm = True
        await self._report_health()

    async def _watch_database(self) -> None:
        """The catalog service's health follows its database (`watch_database`)."""

        async def report(answers: bool) -> None:
            self._database_answers = answers
            await self._report_health()

        assert self.store is not None
        await watch_database(self.store.check, report, what="the catalog database")

    async def _sweep_workers(self) -> None:
        """Delete workers silent for the store's `worker_retention`, once per heartbeat TTL."""
        while True:
            await asyncio.sleep(max(1.0, float(self.settings.heartbeat_ttl_seconds)))
            if self.store is None:
                continue
            try:
                gone = await asyncio.to_thread(self.store.sweep_workers)
            except Exception as exc:  # a database hiccup: try again next round
                log.warning("sweeping expired workers failed: %s", exc)
                continue
            if gone:
                log.info("swept %d expired worker(s): %s", len(gone), ", ".join(gone))

    async def stop(self) -> None:
        for task in (self._sweeper, self._database_watch, self._warmup):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._sweeper = self._database_watch = self._warmup = None
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
