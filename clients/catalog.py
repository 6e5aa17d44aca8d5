"""Typed clients of `modelyard.catalog.v1.CatalogService` (sync and asyncio)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from google.protobuf import field_mask_pb2

from clients.base import AsyncClient, SyncClient
from modelyard.catalog.v1 import catalog_service_pb2 as pb
from modelyard.catalog.v1 import catalog_service_pb2_grpc as pb_grpc
from modelyard.catalog.v1 import model_pb2, worker_pb2

SERVICE = "modelyard.catalog.v1.CatalogService"
DEFAULT_ADDRESS = "localhost:50051"
DRY_RUN_TIMEOUT = 90.0
"""Deadline of a CheckCompatibility with `dry_run` (the catalog gives the worker up to 60 s)."""


def model_name(model: str) -> str:
    """`x` or `models/x` -> `models/x`; empty stays empty (the server says it is required)."""
    return model if not model or model.startswith("models/") else f"models/{model}"


def worker_name(worker: str) -> str:
    """`x` or `workers/x` -> `workers/x`; empty stays empty."""
    return worker if not worker or worker.startswith("workers/") else f"workers/{worker}"


class _Requests:
    """Request builders shared by the sync and asyncio clients."""

    @staticmethod
    def import_model(
        source: str,
        *,
        model_id: str = "",
        display_name: str = "",
        description: str = "",
        tags: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
        parent: str = "",
        training_job: str = "",
        allow_download: bool = False,
    ) -> pb.ImportModelRequest:
        return pb.ImportModelRequest(
            source=source,
            model_id=model_id,
            display_name=display_name,
            description=description,
            tags=list(tags),
            labels=dict(labels or {}),
            parent=model_name(parent) if parent else "",
            training_job=training_job,
            allow_download=allow_download,
        )

    @staticmethod
    def update_model(model: model_pb2.Model, paths: Sequence[str]) -> pb.UpdateModelRequest:
        return pb.UpdateModelRequest(model=model, update_mask=field_mask_pb2.FieldMask(paths=list(paths)))

    @staticmethod
    def check_compatibility(
        model: str, worker: str, engine_spec: worker_pb2.EngineSpec | None, dry_run: bool
    ) -> pb.CheckCompatibilityRequest:
        request = pb.CheckCompatibilityRequest(model=model_name(model), dry_run=dry_run)
        if worker:
            request.worker = worker_name(worker)
        elif engine_spec is not None:
            request.engine_spec.CopyFrom(engine_spec)
        return request

    @staticmethod
    def report_engine_outcome(model: str, outcome: worker_pb2.EngineOutcome) -> pb.ReportEngineOutcomeRequest:
        return pb.ReportEngineOutcomeRequest(model=model_name(model), outcome=outcome)


class CatalogClient(SyncClient):
    """Blocking client of the catalog."""

    SERVICE = SERVICE
    STUB = pb_grpc.CatalogServiceStub

    def create_model(self, model_id: str, model: model_pb2.Model) -> model_pb2.Model:
        """Create an entry from a full description."""
        return self.call(
            "CreateModel", pb.CreateModelRequest(model_id=model_id, model=model), lambda r: r.model
        )

    def import_model(self, source: str, *, timeout: float | None = 600.0, **kwargs: Any) -> model_pb2.Model:
        """Import a folder, file or hub id; returns the READY model."""
        request = _Requests.import_model(source, **kwargs)
        return self.call("ImportModel", request, lambda r: r.model, timeout=timeout)

    def get_model(self, model: str) -> model_pb2.Model:
        """Get one model."""
        return self.call("GetModel", pb.GetModelRequest(name=model_name(model)), lambda r: r.model)

    def list_models_page(
        self, *, filter: str = "", page_size: int = 0, page_token: str = ""
    ) -> pb.ListModelsResponse:
        """One page of models."""
        return self.call(
            "ListModels", pb.ListModelsRequest(filter=filter, page_size=page_size, page_token=page_token)
        )

    def list_models(self, *, filter: str = "", page_size: int = 100) -> Iterator[model_pb2.Model]:
        """Iterate over all models matching `filter`, page by page."""
        token = ""
        while True:
            page = self.list_models_page(filter=filter, page_size=page_size, page_token=token)
            yield from page.models
            token = page.next_page_token
            if not token:
                return

    def update_model(self, model: model_pb2.Model, paths: Sequence[str]) -> model_pb2.Model:
        """Update the fields named in `paths`."""
        return self.call("UpdateModel", _Requests.update_model(model, paths), lambda r: r.model)

    def delete_model(self, model: str, *, force: bool = False, etag: str = "") -> list[str]:
        """Delete a model (and with `force` its descendants); returns the deleted names."""
        request = pb.DeleteModelRequest(name=model_name(model), force=force, etag=etag)
        return self.call("DeleteModel", request, lambda r: list(r.deleted))

    def validate_model(self, model: str, *, deep: bool = False) -> pb.ValidateModelResponse:
        """Validate a model's files and config."""
        return self.call(
            "ValidateModel", pb.ValidateModelRequest(name=model_name(model), deep=deep), timeout=600.0
        )

    def watch_model(self, model: str, *, timeout: float | None = None) -> Iterator[pb.WatchModelResponse]:
        """Stream a model's state changes."""
        return self.stream("WatchModel", pb.WatchModelRequest(name=model_name(model)), timeout=timeout)

    def get_lineage(self, model: str) -> pb.GetModelLineageResponse:
        """Ancestors and descendants of a model."""
        return self.call("GetModelLineage", pb.GetModelLineageRequest(name=model_name(model)))

    def detect_model_type(self, *, model: str = "", path: str = "") -> pb.DetectModelTypeResponse:
        """Detect the model type of a catalog model or a path."""
        request = (
            pb.DetectModelTypeRequest(name=model_name(model))
            if model
            else pb.DetectModelTypeRequest(path=path)
        )
        return self.call("DetectModelType", request)

    def resolve_model(self, model: str) -> pb.ResolveModelResponse:
        """Resolve a name or hub id to a local path."""
        return self.call("ResolveModel", pb.ResolveModelRequest(model=model))

    def register_worker(self, worker_id: str, worker: worker_pb2.Worker) -> pb.RegisterWorkerResponse:
        """Register (or re-register) a worker."""
        return self.call("RegisterWorker", pb.RegisterWorkerRequest(worker_id=worker_id, worker=worker))

    def heartbeat(self, request: pb.HeartbeatRequest) -> worker_pb2.Worker:
        """Send a heartbeat."""
        return self.call("Heartbeat", request, lambda r: r.worker)

    def deregister_worker(self, worker: str) -> None:
        """Remove a worker."""
        self.call("DeregisterWorker", pb.DeregisterWorkerRequest(name=worker_name(worker)))

    def get_worker(self, worker: str) -> worker_pb2.Worker:
        """Get one worker."""
        return self.call("GetWorker", pb.GetWorkerRequest(name=worker_name(worker)), lambda r: r.worker)

    def list_workers(self, *, filter: str = "", page_size: int = 100) -> Iterator[worker_pb2.Worker]:
        """Iterate over all workers matching `filter`."""
        token = ""
        while True:
            page: pb.ListWorkersResponse = self.call(
                "ListWorkers", pb.ListWorkersRequest(filter=filter, page_size=page_size, page_token=token)
            )
            yield from page.workers
            token = page.next_page_token
            if not token:
                return

    def check_compatibility(
        self,
        model: str,
        *,
        worker: str = "",
        engine_spec: worker_pb2.EngineSpec | None = None,
        dry_run: bool = False,
    ) -> worker_pb2.CompatibilityReport:
        """Check a model against a worker or an engine spec; with `dry_run`, the (inference)
        worker first validates the model with its engines (a `dry_run` result is added)."""
        request = _Requests.check_compatibility(model, worker, engine_spec, dry_run)
        timeout = DRY_RUN_TIMEOUT if dry_run else None
        return self.call("CheckCompatibility", request, lambda r: r.report, timeout=timeout)

    def find_workers(
        self,
        model: str,
        role: worker_pb2.WorkerRole.ValueType = worker_pb2.WORKER_ROLE_UNSPECIFIED,
        *,
        embeddings: bool = False,
    ) -> pb.FindWorkersResponse:
        """Healthy compatible workers for a model, best first, and the rejected ones with reasons
        (`embeddings`: only workers that can embed it)."""
        request = pb.FindWorkersRequest(model=model_name(model), role=role, embeddings=embeddings)
        return self.call("FindWorkers", request)

    def report_engine_outcome(
        self, model: str, outcome: worker_pb2.EngineOutcome
    ) -> worker_pb2.EngineOutcome:
        """Record what an engine did with a model (workers do this); returns the outcome as recorded."""
        request = _Requests.report_engine_outcome(model, outcome)
        return self.call("ReportEngineOutcome", request, lambda r: r.outcome)


class AsyncCatalogClient(AsyncClient):
    """asyncio client of the catalog (service-to-service calls)."""

    SERVICE = SERVICE
    STUB = pb_grpc.CatalogServiceStub

    async def import_model(
        self, source: str, *, timeout: float | None = 600.0, **kwargs: Any
    ) -> model_pb2.Model:
        """Import a folder, file or hub id; returns the READY model."""
        request = _Requests.import_model(source, **kwargs)
        return await self.call("ImportModel", request, lambda r: r.model, timeout=timeout)

    async def create_model(self, model_id: str, model: model_pb2.Model) -> model_pb2.Model:
        """Create an entry from a full description."""
        return await self.call(
            "CreateModel", pb.CreateModelRequest(model_id=model_id, model=model), lambda r: r.model
        )

    async def get_model(self, model: str) -> model_pb2.Model:
        """Get one model."""
        return await self.call("GetModel", pb.GetModelRequest(name=model_name(model)), lambda r: r.model)

    async def list_models_page(
        self, *, filter: str = "", page_size: int = 0, page_token: str = ""
    ) -> pb.ListModelsResponse:
        """One page of models."""
        return await self.call(
            "ListModels", pb.ListModelsRequest(filter=filter, page_size=page_size, page_token=page_token)
        )

    async def list_models(self, *, filter: str = "", page_size: int = 100) -> AsyncIterator[model_pb2.Model]:
        """Iterate over all models matching `filter`."""
        token = ""
        while True:
            page: pb.ListModelsResponse = await self.call(
                "ListModels", pb.ListModelsRequest(filter=filter, page_size=page_size, page_token=token)
            )
            for model in page.models:
                yield model
            token = page.next_page_token
            if not token:
                return

    async def update_model(self, model: model_pb2.Model, paths: Sequence[str]) -> model_pb2.Model:
        """Update the fields named in `paths`."""
        return await self.call("UpdateModel", _Requests.update_model(model, paths), lambda r: r.model)

    async def delete_model(self, model: str, *, force: bool = False, etag: str = "") -> list[str]:
        """Delete a model (and with `force` its descendants); returns the deleted names."""
        request = pb.DeleteModelRequest(name=model_name(model), force=force, etag=etag)
        return await self.call("DeleteModel", request, lambda r: list(r.deleted))

    async def validate_model(self, model: str, *, deep: bool = False) -> pb.ValidateModelResponse:
        """Validate a model's files and config."""
        return await self.call(
            "ValidateModel", pb.ValidateModelRequest(name=model_name(model), deep=deep), timeout=600.0
        )

    async def get_lineage(self, model: str) -> pb.GetModelLineageResponse:
        """Ancestors and descendants of a model."""
        return await self.call("GetModelLineage", pb.GetModelLineageRequest(name=model_name(model)))

    async def detect_model_type(self, *, model: str = "", path: str = "") -> pb.DetectModelTypeResponse:
        """Detect the model type of a catalog model or a path."""
        request = (
            pb.DetectModelTypeRequest(name=model_name(model))
            if model
            else pb.DetectModelTypeRequest(path=path)
        )
        return await self.call("DetectModelType", request)

    async def watch_model(self, model: str) -> AsyncIterator[pb.WatchModelResponse]:
        """Stream a model's state changes."""
        async for change in self.stream("WatchModel", pb.WatchModelRequest(name=model_name(model))):
            yield change

    async def resolve_model(self, model: str) -> pb.ResolveModelResponse:
        """Resolve a name or hub id to a local path."""
        return await self.call("ResolveModel", pb.ResolveModelRequest(model=model))

    async def register_worker(self, worker_id: str, worker: worker_pb2.Worker) -> pb.RegisterWorkerResponse:
        """Register (or re-register) a worker."""
        return await self.call("RegisterWorker", pb.RegisterWorkerRequest(worker_id=worker_id, worker=worker))

    async def heartbeat(self, request: pb.HeartbeatRequest) -> worker_pb2.Worker:
        """Send a heartbeat."""
        return await self.call("Heartbeat", request, lambda r: r.worker)

    async def deregister_worker(self, worker: str) -> None:
        """Remove a worker."""
        await self.call("DeregisterWorker", pb.DeregisterWorkerRequest(name=worker_name(worker)))

    async def get_worker(self, worker: str) -> worker_pb2.Worker:
        """Get one worker."""
        return await self.call("GetWorker", pb.GetWorkerRequest(name=worker_name(worker)), lambda r: r.worker)

    async def list_workers(
        self, *, filter: str = "", page_size: int = 100
    ) -> AsyncIterator[worker_pb2.Worker]:
        """Iterate over all workers matching `filter`."""
        token = ""
        while True:
            page: pb.ListWorkersResponse = await self.call(
                "ListWorkers", pb.ListWorkersRequest(filter=filter, page_size=page_size, page_token=token)
            )
            for worker in page.workers:
                yield worker
            token = page.next_page_token
            if not token:
                return

    async def check_compatibility(
        self,
        model: str,
        *,
        worker: str = "",
        engine_spec: worker_pb2.EngineSpec | None = None,
        dry_run: bool = False,
    ) -> worker_pb2.CompatibilityReport:
        """Check a model against a worker or an engine spec; with `dry_run`, the (inference)
        worker first validates the model with its engines (a `dry_run` result is added)."""
        request = _Requests.check_compatibility(model, worker, engine_spec, dry_run)
        timeout = DRY_RUN_TIMEOUT if dry_run else None
        return await self.call("CheckCompatibility", request, lambda r: r.report, timeout=timeout)

    async def find_workers(
        self,
        model: str,
        role: worker_pb2.WorkerRole.ValueType = worker_pb2.WORKER_ROLE_UNSPECIFIED,
        *,
        embeddings: bool = False,
    ) -> pb.FindWorkersResponse:
        """Healthy compatible workers for a model, best first (`embeddings`: that can embed it)."""
        request = pb.FindWorkersRequest(model=model_name(model), role=role, embeddings=embeddings)
        return await self.call("FindWorkers", request)

    async def report_engine_outcome(
        self, model: str, outcome: worker_pb2.EngineOutcome
    ) -> worker_pb2.EngineOutcome:
        """Record what an engine did with a model (workers do this); returns the outcome as recorded."""
        request = _Requests.report_engine_outcome(model, outcome)
        return await self.call("ReportEngineOutcome", request, lambda r: r.outcome)
