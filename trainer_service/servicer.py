"""TrainerService servicer: translates protos to domain calls and back, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from modelyard.trainer.v1 import trainer_service_pb2 as pb
from modelyard.trainer.v1 import trainer_service_pb2_grpc
from trainer_service.artifacts.service import ArtifactManager
from trainer_service.manager import JobManager, format_value


class TrainerServicer(trainer_service_pb2_grpc.TrainerServiceServicer):
    """`modelyard.trainer.v1.TrainerService` over a `JobManager` (jobs) and an
    `ArtifactManager` (merges and exports)."""

    def __init__(self, manager: JobManager, artifacts: ArtifactManager | None = None) -> None:
        self.manager = manager
        self.artifacts = artifacts or ArtifactManager(manager.catalog, manager.config.data_dir)

    async def CreateTrainingJob(
        self, request: pb.CreateTrainingJobRequest, context: aio.ServicerContext
    ) -> pb.CreateTrainingJobResponse:
        job = await self.manager.create(request.job_id, request.job, validate_only=request.validate_only)
        return pb.CreateTrainingJobResponse(job=job)

    async def GetTrainingJob(
        self, request: pb.GetTrainingJobRequest, context: aio.ServicerContext
    ) -> pb.GetTrainingJobResponse:
        return pb.GetTrainingJobResponse(job=await self.manager.get(request.name))

    async def ListTrainingJobs(
        self, request: pb.ListTrainingJobsRequest, context: aio.ServicerContext
    ) -> pb.ListTrainingJobsResponse:
        jobs, token = await self.manager.list_jobs(
            page_size=request.page_size, page_token=request.page_token, filter=request.filter
        )
        return pb.ListTrainingJobsResponse(jobs=jobs, next_page_token=token)

    async def CancelTrainingJob(
        self, request: pb.CancelTrainingJobRequest, context: aio.ServicerContext
    ) -> pb.CancelTrainingJobResponse:
        return pb.CancelTrainingJobResponse(job=await self.manager.cancel(request.name))

    async def WatchTrainingJob(
        self, request: pb.WatchTrainingJobRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.WatchTrainingJobResponse]:
        async for event in self.manager.watch(request.name):
            yield pb.WatchTrainingJobResponse(event_type=event.type, job=event.job)  # type: ignore[arg-type]

    async def ValidateDataset(
        self, request: pb.ValidateDatasetRequest, context: aio.ServicerContext
    ) -> pb.ValidateDatasetResponse:
        max_seq_length = request.max_seq_length if request.HasField("max_seq_length") else None
        report, fmt = await self.manager.validate_dataset(
            request.dataset, request.method, request.base_model, max_seq_length
        )
        response = pb.ValidateDatasetResponse(
            valid=report.valid,
            format=format_value(fmt),
            num_rows=report.num_rows,
            issues=[pb.RowIssue(row=i.row, field=i.field, message=i.message) for i in report.issues],
        )
        if report.max_tokens is not None:
            response.max_tokens = report.max_tokens
        return response

    async def ListTrainingMetrics(
        self, request: pb.ListTrainingMetricsRequest, context: aio.ServicerContext
    ) -> pb.ListTrainingMetricsResponse:
        points, token = await self.manager.list_metrics(
            request.parent, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListTrainingMetricsResponse(points=points, next_page_token=token)

    async def MergeAdapter(
        self, request: pb.MergeAdapterRequest, context: aio.ServicerContext
    ) -> pb.MergeAdapterResponse:
        model = await self.artifacts.merge_adapter(
            request.adapter, request.output_model_id, validate_only=request.validate_only
        )
        return pb.MergeAdapterResponse(model=model)

    async def ExportModel(
        self, request: pb.ExportModelRequest, context: aio.ServicerContext
    ) -> pb.ExportModelResponse:
        model = await self.artifacts.export_model(
            request.model,
            request.format,
            request.quantization,
            request.output_model_id,
            validate_only=request.validate_only,
        )
        return pb.ExportModelResponse(model=model)
