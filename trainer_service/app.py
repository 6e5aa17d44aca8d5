"""The trainer service as a `ServiceApp`: job store, job manager, catalog registration."""

from __future__ import annotations

import asyncio
import logging

from grpc import aio
from grpc_health.v1 import health, health_pb2
from prometheus_client.registry import Collector

from clients.catalog import AsyncCatalogClient
from modelyard.catalog.v1 import catalog_service_pb2, worker_pb2
from modelyard.trainer.v1 import trainer_service_pb2, trainer_service_pb2_grpc
from server_kit import capabilities
from server_kit.database import watch_database
from server_kit.registration import WorkerRegistration
from trainer_service.db import migrate
from trainer_service.jobs import JobStore
from trainer_service.manager import JobManager, ManagerConfig
from trainer_service.metrics import trainer_collector
from trainer_service.servicer import TrainerServicer
from trainer_service.settings import TrainerSettings

SERVICE_NAME = trainer_service_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name

log = logging.getLogger("modelyard.trainer")


def engine_spec(settings: TrainerSettings) -> worker_pb2.EngineSpec:
    """What this trainer can train: transformers + peft (+ TRL) on this machine's device."""
    device = capabilities.describe_device()
    caps = capabilities.peft_trainer_capabilities(
        allows_remote_code=settings.allow_remote_code, device=device
    )
    return worker_pb2.EngineSpec(role=worker_pb2.WORKER_ROLE_TRAINING, capabilities=caps, device=device)


class TrainerApp:
    """Serves `modelyard.trainer.v1.TrainerService`.

    `start()` migrates and opens the job store, recovers the jobs a previous
    run left RUNNING and starts the scheduler; once serving, the trainer
    registers with the catalog (role TRAINING, engine `peft`) and heartbeats
    with its load. `stop()` preempts running jobs (they resume later from a
    checkpoint), deregisters and closes the store.
    """

    service_names = (SERVICE_NAME,)

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.store: JobStore | None = None
        self.catalog: AsyncCatalogClient | None = None
        self.manager: JobManager | None = None
        self.registration: WorkerRegistration | None = None
        self.spec: worker_pb2.EngineSpec | None = None
        self._health: health.aio.HealthServicer | None = None
        self._database_watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.resolved_database_url()
        await asyncio.to_thread(migrate, url)
        self.store = JobStore(url)
        self.spec = await asyncio.to_thread(engine_spec, settings)
        if settings.catalog_address:
            self.catalog = AsyncCatalogClient(
                settings.catalog_address,
                token=settings.catalog_token or settings.service_token or None,
                tls=settings.client_tls(),
            )
        config = ManagerConfig(
            data_dir=settings.data_dir,
            worker_id=settings.resolved_worker_id(),
            engine_spec=self.spec,
            max_concurrent_jobs=settings.max_concurrent_jobs,
            num_processes=settings.num_processes,
            lease_seconds=settings.lease_seconds,
            poll_seconds=settings.poll_seconds,
            max_resumes=settings.max_resumes,
            preempt_seconds=settings.grace_seconds,
            dataset_roots=settings.resolved_dataset_roots(),
            datasets_cache=settings.resolved_datasets_cache(),
            allow_remote_code=settings.allow_remote_code,
        )
        self.manager = JobManager(self.store, self.catalog, config)
        await self.manager.start()

    def add_to_server(self, server: aio.Server) -> None:
        assert self.manager is not None, "start() first"
        trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(self.manager), server)

    def metrics_collectors(self) -> list[Collector]:
        """Job states and the progress of this trainer's jobs (`trainer_service.metrics`)."""
        return [trainer_collector(lambda: self.store, lambda: self.manager)]

    def use_health(self, servicer: health.aio.HealthServicer) -> None:
        """The server's health servicer: the trainer service is NOT_SERVING while the job
        database does not answer (``""`` stays SERVING: the process works)."""
        self._health = servicer

    def _check_database(self) -> None:
        if self.store is not None:
            self.store.check()

    async def _report_database(self, answers: bool) -> None:
        if self._health is not None:
            serving = health_pb2.HealthCheckResponse.SERVING
            await self._health.set(
                SERVICE_NAME, serving if answers else health_pb2.HealthCheckResponse.NOT_SERVING
            )

    async def on_serving(self, port: int) -> None:
        if self.store is not None:
            self._database_watch = asyncio.create_task(
                watch_database(self._check_database, self._report_database, what="the trainer database"),
                name="watch-database",
            )
        if not self.settings.catalog_address:
            return
        self.registration = WorkerRegistration(
            self.settings.catalog_address,
            self.settings.resolved_worker_id(),
            lambda: self._describe(port),
            self._heartbeat,
            token=self.settings.catalog_token or self.settings.service_token or None,
            tls=self.settings.client_tls(),
        )
        await self.registration.start()

    def _describe(self, port: int) -> worker_pb2.Worker:
        assert self.spec is not None
        address = self.settings.advertise_address or f"localhost:{port}"
        return worker_pb2.Worker(
            display_name=f"trainer ({self.spec.capabilities.engine})",
            address=address,
            role=worker_pb2.WORKER_ROLE_TRAINING,
            capabilities=self.spec.capabilities,
            device=capabilities.describe_device(),
            load=self._load(),
        )

    def _load(self) -> worker_pb2.WorkerLoad:
        if self.manager is None:
            return worker_pb2.WorkerLoad()
        return worker_pb2.WorkerLoad(running=len(self.manager.running_jobs), queued=self.manager.queued_count)

    def _heartbeat(self) -> catalog_service_pb2.HeartbeatRequest:
        device = capabilities.describe_device()
        return catalog_service_pb2.HeartbeatRequest(
            load=self._load(),
            free_memory_bytes=device.free_memory_bytes,
            state=worker_pb2.WORKER_STATE_HEALTHY,
        )

    async def stop(self) -> None:
        if self._database_watch is not None:
            self._database_watch.cancel()
            await asyncio.gather(self._database_watch, return_exceptions=True)
            self._database_watch = None
        if self.manager is not None:
            await self.manager.stop()
        if self.registration is not None:
            await self.registration.stop()
        if self.catalog is not None:
            await self.catalog.close()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
