"""CatalogService servicer: translates protos to `Catalog` calls and back, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from catalog_service.catalog import Catalog, ImportOptions, model_id_of
from modelyard.catalog.v1 import catalog_service_pb2 as pb
from modelyard.catalog.v1 import catalog_service_pb2_grpc as pb_grpc


class CatalogServicer(pb_grpc.CatalogServiceServicer):
    """The gRPC face of `Catalog`."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    async def CreateModel(
        self, request: pb.CreateModelRequest, context: aio.ServicerContext
    ) -> pb.CreateModelResponse:
        model = await self.catalog.create_model(request.model_id, request.model)
        return pb.CreateModelResponse(model=model)

    async def ImportModel(
        self, request: pb.ImportModelRequest, context: aio.ServicerContext
    ) -> pb.ImportModelResponse:
        options = ImportOptions(
            model_id=request.model_id,
            display_name=request.display_name,
            description=request.description,
            tags=list(request.tags),
            labels=dict(request.labels),
            parent=request.parent,
            training_job=request.training_job,
            allow_download=request.allow_download,
        )
        model = await self.catalog.import_model(request.source, options)
        return pb.ImportModelResponse(model=model)

    async def GetModel(
        self, request: pb.GetModelRequest, context: aio.ServicerContext
    ) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=await self.catalog.get_model(request.name))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models, token = await self.catalog.list_models(request.page_size, request.page_token, request.filter)
        response = pb.ListModelsResponse(next_page_token=token)
        add = response.models.add
        for model in models:  # half the cost of `models=models` (upb copies twice there)
            add().CopyFrom(model)
        return response

    async def UpdateModel(
        self, request: pb.UpdateModelRequest, context: aio.ServicerContext
    ) -> pb.UpdateModelResponse:
        model = await self.catalog.update_model(request.model, list(request.update_mask.paths))
        return pb.UpdateModelResponse(model=model)

    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: aio.ServicerContext
    ) -> pb.DeleteModelResponse:
        deleted = await self.catalog.delete_model(request.name, force=request.force, etag=request.etag)
        return pb.DeleteModelResponse(deleted=deleted)

    async def ValidateModel(
        self, request: pb.ValidateModelRequest, context: aio.ServicerContext
    ) -> pb.ValidateModelResponse:
        return await self.catalog.validate_model(request.name, deep=request.deep)

    async def WatchModel(
        self, request: pb.WatchModelRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.WatchModelResponse]:
        model_id = model_id_of(request.name)
        queue = self.catalog.events.subscribe(model_id)
        try:
            current = await self.catalog.get_model(model_id)
            yield pb.WatchModelResponse(model=current)
            last_update = (current.update_time.seconds, current.update_time.nanos, current.state)
            while True:
                change = await queue.get()
                stamp = (change.model.update_time.seconds, change.model.update_time.nanos, change.model.state)
                if not change.deleted and stamp <= last_update and change.model.state == current.state:
                    continue  # already sent as the current state
                last_update = stamp
                yield pb.WatchModelResponse(model=change.model, deleted=change.deleted)
                if change.deleted:
                    return
        finally:
            self.catalog.events.unsubscribe(model_id, queue)

    async def GetModelLineage(
        self, request: pb.GetModelLineageRequest, context: aio.ServicerContext
    ) -> pb.GetModelLineageResponse:
        model, ancestors, descendants = await self.catalog.get_lineage(request.name)
        return pb.GetModelLineageResponse(model=model, ancestors=ancestors, descendants=descendants)

    async def DetectModelType(
        self, request: pb.DetectModelTypeRequest, context: aio.ServicerContext
    ) -> pb.DetectModelTypeResponse:
        return await self.catalog.detect_model_type(name=request.name, path=request.path)

    async def ResolveModel(
        self, request: pb.ResolveModelRequest, context: aio.ServicerContext
    ) -> pb.ResolveModelResponse:
        return await self.catalog.resolve_model(request.model)

    async def RegisterWorker(
        self, request: pb.RegisterWorkerRequest, context: aio.ServicerContext
    ) -> pb.RegisterWorkerResponse:
        worker = await self.catalog.register_worker(request.worker_id, request.worker)
        return pb.RegisterWorkerResponse(
            worker=worker, heartbeat_ttl_seconds=self.catalog.settings.heartbeat_ttl_seconds
        )

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse(worker=await self.catalog.heartbeat(request))

    async def DeregisterWorker(
        self, request: pb.DeregisterWorkerRequest, context: aio.ServicerContext
    ) -> pb.DeregisterWorkerResponse:
        await self.catalog.deregister_worker(request.name)
        return pb.DeregisterWorkerResponse()

    async def GetWorker(
        self, request: pb.GetWorkerRequest, context: aio.ServicerContext
    ) -> pb.GetWorkerResponse:
        return pb.GetWorkerResponse(worker=await self.catalog.get_worker(request.name))

    async def ListWorkers(
        self, request: pb.ListWorkersRequest, context: aio.ServicerContext
    ) -> pb.ListWorkersResponse:
        workers, token = await self.catalog.list_workers(
            request.page_size, request.page_token, request.filter
        )
        return pb.ListWorkersResponse(workers=workers, next_page_token=token)

    async def CheckCompatibility(
        self, request: pb.CheckCompatibilityRequest, context: aio.ServicerContext
    ) -> pb.CheckCompatibilityResponse:
        spec = request.engine_spec if request.HasField("engine_spec") else None
        report = await self.catalog.check_compatibility(
            request.model, worker=request.worker, engine_spec=spec, dry_run=request.dry_run
        )
        return pb.CheckCompatibilityResponse(report=report)

    async def FindWorkers(
        self, request: pb.FindWorkersRequest, context: aio.ServicerContext
    ) -> pb.FindWorkersResponse:
        return await self.catalog.find_workers(request.model, request.role, embeddings=request.embeddings)

    async def ReportEngineOutcome(
        self, request: pb.ReportEngineOutcomeRequest, context: aio.ServicerContext
    ) -> pb.ReportEngineOutcomeResponse:
        outcome = await self.catalog.report_engine_outcome(request.model, request.outcome)
        return pb.ReportEngineOutcomeResponse(outcome=outcome)
