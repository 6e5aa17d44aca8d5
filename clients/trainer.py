"""Typed clients of `modelyard.trainer.v1.TrainerService` (sync and asyncio).

Hyperparameters are keyword arguments named like the fields of
`Hyperparameters` (`epochs=`, `max_steps=`, `learning_rate=`, `batch_size=`,
...) plus `lora_r=`, `lora_alpha=`, `lora_dropout=`, `lora_target_modules=`
for the `LoraParams`; `None` leaves a field unset so the trainer's default
applies. A method is a `TrainingMethod` value or its short name (`"lora"`,
`"qlora"`, `"full"`, `"dpo"`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, TypeAlias, TypedDict, Unpack

from clients.base import AsyncClient, SyncClient
from clients.catalog import model_name
from modelyard.trainer.v1 import trainer_service_pb2 as pb
from modelyard.trainer.v1 import trainer_service_pb2_grpc as pb_grpc

SERVICE = "modelyard.trainer.v1.TrainerService"
DEFAULT_ADDRESS = "localhost:50052"

TERMINAL_STATES = frozenset(
    {
        pb.TRAINING_JOB_STATE_SUCCEEDED,
        pb.TRAINING_JOB_STATE_FAILED,
        pb.TRAINING_JOB_STATE_CANCELLED,
    }
)

MethodLike: TypeAlias = int | str
"""A `TrainingMethod` value or its short name (`"lora"`, `"qlora"`, `"full"`, `"dpo"`, `"orpo"`, ...)."""
FormatLike: TypeAlias = int | str
"""A `DatasetFormat` value or its short name (`"text"`, `"prompt_completion"`, `"chat"`, `"preference"`)."""


class HyperparameterOptions(TypedDict, total=False):
    """Keyword arguments that set `Hyperparameters` fields; `None` leaves a field unset."""

    epochs: float | None
    max_steps: int | None
    learning_rate: float | None
    lr_scheduler: str | None
    warmup_ratio: float | None
    batch_size: int | None
    gradient_accumulation_steps: int | None
    max_seq_length: int | None
    seed: int | None
    eval_split: float | None
    eval_steps: int | None
    save_steps: int | None
    weight_decay: float | None
    dpo_beta: float | None
    lora_r: int | None
    lora_alpha: float | None
    lora_dropout: float | None
    lora_target_modules: Sequence[str] | None
    grpo_reward_functions: Sequence[str] | None
    grpo_reward_model: str | None
    grpo_num_generations: int | None
    grpo_max_completion_length: int | None
    grpo_temperature: float | None


TaskLike: TypeAlias = int | str
"""A `TrainingTask` value or its short name (`"summarization"`, `"question_answering"`)."""


def training_task(task: TaskLike) -> pb.TrainingTask.ValueType:
    """`"summarization"`, `"question_answering"`, "" or the enum value -> the enum value."""
    if isinstance(task, int):
        return pb.TrainingTask.ValueType(task)
    key = task.strip().upper().replace("-", "_").removeprefix("TRAINING_TASK_")
    if not key:
        return pb.TRAINING_TASK_UNSPECIFIED
    try:
        return pb.TrainingTask.Value(f"TRAINING_TASK_{key}")
    except ValueError:
        known = [name.removeprefix("TRAINING_TASK_").lower() for name in pb.TrainingTask.keys()[1:]]
        raise ValueError(f"unknown task {task!r}; known: {', '.join(known)}") from None


HYPERPARAMETER_FIELDS = frozenset(f.name for f in pb.Hyperparameters.DESCRIPTOR.fields) - {"lora", "grpo"}
LORA_FIELDS = frozenset(f.name for f in pb.LoraParams.DESCRIPTOR.fields)
GRPO_FIELDS = frozenset(f.name for f in pb.GrpoParams.DESCRIPTOR.fields)


def job_name(job: str) -> str:
    """`x` or `trainingJobs/x` -> `trainingJobs/x`; empty stays empty."""
    return job if not job or job.startswith("trainingJobs/") else f"trainingJobs/{job}"


def training_method(method: MethodLike) -> pb.TrainingMethod.ValueType:
    """`"lora"`, `"LORA"`, `"TRAINING_METHOD_LORA"` or the enum value -> the enum value."""
    if isinstance(method, int):
        return pb.TrainingMethod.ValueType(method)
    key = method.strip().upper().removeprefix("TRAINING_METHOD_")
    try:
        return pb.TrainingMethod.Value(f"TRAINING_METHOD_{key}")
    except ValueError:
        known = [name.removeprefix("TRAINING_METHOD_").lower() for name in pb.TrainingMethod.keys()[1:]]
        raise ValueError(f"unknown training method {method!r}; known: {', '.join(known)}") from None


def dataset_format(fmt: FormatLike) -> pb.DatasetFormat.ValueType:
    """`"chat"`, `"prompt_completion"`, ... or the enum value -> the enum value."""
    if isinstance(fmt, int):
        return pb.DatasetFormat.ValueType(fmt)
    key = fmt.strip().upper().replace("-", "_").removeprefix("DATASET_FORMAT_")
    try:
        return pb.DatasetFormat.Value(f"DATASET_FORMAT_{key}")
    except ValueError:
        known = [name.removeprefix("DATASET_FORMAT_").lower() for name in pb.DatasetFormat.keys()[1:]]
        raise ValueError(f"unknown dataset format {fmt!r}; known: {', '.join(known)}") from None


def hyperparameters(base: pb.Hyperparameters | None = None, **options: Any) -> pb.Hyperparameters:
    """`Hyperparameters` from `base` (copied) with the non-None `options` set on top.

    `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules` set the
    `lora` sub-message, `grpo_*` the `grpo` one. Raises TypeError for an unknown name.
    """
    params = pb.Hyperparameters()
    if base is not None:
        params.CopyFrom(base)
    for key, value in options.items():
        lora_key = key.removeprefix("lora_")
        if key in HYPERPARAMETER_FIELDS:
            target: Any = params
            field = key
        elif key.startswith("lora_") and lora_key in LORA_FIELDS:
            target = params.lora
            field = lora_key
        elif key.startswith("grpo_") and key.removeprefix("grpo_") in GRPO_FIELDS:
            target = params.grpo
            field = key.removeprefix("grpo_")
        else:
            raise TypeError(f"unknown hyperparameter {key!r}")
        if value is None:
            continue
        if field in ("target_modules", "reward_functions"):
            del getattr(target, field)[:]
            getattr(target, field).extend(value)
        else:
            setattr(target, field, value)
    return params


def dataset(source: str | pb.Dataset, *, format: FormatLike = 0, split: str = "") -> pb.Dataset:
    """A `Dataset` from a source path or name (or a `Dataset`, returned as is)."""
    if isinstance(source, pb.Dataset):
        return source
    return pb.Dataset(source=source, format=dataset_format(format), split=split)


class _Requests:
    """Request builders shared by the sync and asyncio clients."""

    @staticmethod
    def create(
        base_model: str,
        data: str | pb.Dataset,
        *,
        method: MethodLike,
        hyperparameters_: pb.Hyperparameters | None,
        output_model_id: str,
        job_id: str,
        labels: Mapping[str, str] | None,
        dataset_format_: FormatLike,
        validate_only: bool,
        options: Mapping[str, Any],
        task: TaskLike = 0,
    ) -> pb.CreateTrainingJobRequest:
        job = pb.TrainingJob(
            base_model=model_name(base_model),
            dataset=dataset(data, format=dataset_format_),
            method=training_method(method),
            hyperparameters=hyperparameters(hyperparameters_, **options),
            output_model_id=output_model_id,
            labels=dict(labels or {}),
            task=training_task(task),
        )
        return pb.CreateTrainingJobRequest(job_id=job_id, job=job, validate_only=validate_only)

    @staticmethod
    def validate(
        data: str | pb.Dataset, method: MethodLike, base_model: str, max_seq_length: int | None
    ) -> pb.ValidateDatasetRequest:
        request = pb.ValidateDatasetRequest(
            dataset=dataset(data),
            method=training_method(method),
            base_model=model_name(base_model) if base_model else "",
        )
        if max_seq_length is not None:
            request.max_seq_length = max_seq_length
        return request

    @staticmethod
    def export(
        model: str, quantization: str, output_model_id: str, validate_only: bool
    ) -> pb.ExportModelRequest:
        return pb.ExportModelRequest(
            model=model_name(model),
            format=pb.EXPORT_FORMAT_GGUF,
            quantization=quantization,
            output_model_id=output_model_id,
            validate_only=validate_only,
        )


class TrainerClient(SyncClient):
    """Blocking client of the trainer.

    ```python
    with TrainerClient("localhost:50052") as trainer:
        job = trainer.create_training_job("tiny-llama", "/data/chat.jsonl", method="lora", max_steps=20)
        for event in trainer.watch_training_job(job.name):
            print(event.job.progress.step, event.job.progress.loss)
    ```
    """

    SERVICE = SERVICE
    STUB = pb_grpc.TrainerServiceStub

    def create_training_job(
        self,
        base_model: str,
        dataset: str | pb.Dataset,
        *,
        method: MethodLike = pb.TRAINING_METHOD_LORA,
        hyperparameters: pb.Hyperparameters | None = None,
        output_model_id: str = "",
        job_id: str = "",
        labels: Mapping[str, str] | None = None,
        dataset_format: FormatLike = pb.DATASET_FORMAT_UNSPECIFIED,
        validate_only: bool = False,
        timeout: float | None = None,
        task: TaskLike = pb.TRAINING_TASK_UNSPECIFIED,
        **options: Unpack[HyperparameterOptions],
    ) -> pb.TrainingJob:
        """Validate and queue a job that fine-tunes `base_model` on `dataset`; returns the QUEUED job."""
        request = _Requests.create(
            base_model, dataset, method=method, hyperparameters_=hyperparameters,
            output_model_id=output_model_id, job_id=job_id, labels=labels,
            dataset_format_=dataset_format, validate_only=validate_only, options=options, task=task,
        )  # fmt: skip
        return self.call("CreateTrainingJob", request, lambda r: r.job, timeout=timeout)

    def get_training_job(self, job: str) -> pb.TrainingJob:
        """Get one job."""
        return self.call("GetTrainingJob", pb.GetTrainingJobRequest(name=job_name(job)), lambda r: r.job)

    def list_training_jobs_page(
        self, *, filter: str = "", page_size: int = 0, page_token: str = ""
    ) -> pb.ListTrainingJobsResponse:
        """One page of jobs, newest first."""
        request = pb.ListTrainingJobsRequest(filter=filter, page_size=page_size, page_token=page_token)
        return self.call("ListTrainingJobs", request)

    def list_training_jobs(self, *, filter: str = "", page_size: int = 100) -> Iterator[pb.TrainingJob]:
        """Iterate over all jobs matching `filter`, newest first, page by page."""
        token = ""
        while True:
            page = self.list_training_jobs_page(filter=filter, page_size=page_size, page_token=token)
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def list_training_metrics_page(
        self, job: str, *, page_size: int = 0, page_token: str = ""
    ) -> pb.ListTrainingMetricsResponse:
        """One page of a job's metric history (every logged step and evaluation), by step."""
        request = pb.ListTrainingMetricsRequest(
            parent=job_name(job), page_size=page_size, page_token=page_token
        )
        return self.call("ListTrainingMetrics", request)

    def list_training_metrics(self, job: str, *, page_size: int = 0) -> Iterator[pb.MetricPoint]:
        """Iterate over a job's whole metric history, page by page."""
        token = ""
        while True:
            page = self.list_training_metrics_page(job, page_size=page_size, page_token=token)
            yield from page.points
            token = page.next_page_token
            if not token:
                return

    def cancel_training_job(self, job: str) -> pb.TrainingJob:
        """Cancel a queued or running job; returns the job after the request."""
        return self.call(
            "CancelTrainingJob", pb.CancelTrainingJobRequest(name=job_name(job)), lambda r: r.job
        )

    def watch_training_job(
        self, job: str, *, timeout: float | None = None
    ) -> Iterator[pb.WatchTrainingJobResponse]:
        """Stream the job's state changes, progress, evals and checkpoints until it ends."""
        return self.stream(
            "WatchTrainingJob", pb.WatchTrainingJobRequest(name=job_name(job)), timeout=timeout
        )

    def wait_training_job(self, job: str, *, timeout: float | None = None) -> pb.TrainingJob:
        """Watch the job until it ends; returns it in its final state."""
        last = None
        for event in self.watch_training_job(job, timeout=timeout):
            last = event.job
            if last.state in TERMINAL_STATES:
                return last
        return last if last is not None else self.get_training_job(job)

    def validate_dataset(
        self,
        dataset: str | pb.Dataset,
        *,
        method: MethodLike = pb.TRAINING_METHOD_LORA,
        base_model: str = "",
        max_seq_length: int | None = None,
        timeout: float | None = None,
    ) -> pb.ValidateDatasetResponse:
        """Check a dataset for a method without training (issues by row)."""
        request = _Requests.validate(dataset, method, base_model, max_seq_length)
        return self.call("ValidateDataset", request, timeout=timeout)

    def merge_adapter(
        self,
        adapter: str,
        *,
        output_model_id: str = "",
        validate_only: bool = False,
        timeout: float | None = 3600.0,
    ) -> str:
        """Merge a LoRA adapter into its base and register the result (parent = the adapter);
        returns the merged model's name ("" when `validate_only`)."""
        request = pb.MergeAdapterRequest(
            adapter=model_name(adapter), output_model_id=output_model_id, validate_only=validate_only
        )
        return self.call("MergeAdapter", request, lambda r: r.model, timeout=timeout)

    def export_model(
        self,
        model: str,
        *,
        quantization: str = "f16",
        output_model_id: str = "",
        validate_only: bool = False,
        timeout: float | None = 3600.0,
    ) -> str:
        """Export a model to GGUF (llama.cpp's converter and quantizer) and register the file
        (parent = the model); returns the exported model's name ("" when `validate_only`)."""
        request = _Requests.export(model, quantization, output_model_id, validate_only)
        return self.call("ExportModel", request, lambda r: r.model, timeout=timeout)


class AsyncTrainerClient(AsyncClient):
    """asyncio client of the trainer (same methods as `TrainerClient`, awaited)."""

    SERVICE = SERVICE
    STUB = pb_grpc.TrainerServiceStub

    async def create_training_job(
        self,
        base_model: str,
        dataset: str | pb.Dataset,
        *,
        method: MethodLike = pb.TRAINING_METHOD_LORA,
        hyperparameters: pb.Hyperparameters | None = None,
        output_model_id: str = "",
        job_id: str = "",
        labels: Mapping[str, str] | None = None,
        dataset_format: FormatLike = pb.DATASET_FORMAT_UNSPECIFIED,
        validate_only: bool = False,
        timeout: float | None = None,
        task: TaskLike = pb.TRAINING_TASK_UNSPECIFIED,
        **options: Unpack[HyperparameterOptions],
    ) -> pb.TrainingJob:
        """Validate and queue a job that fine-tunes `base_model` on `dataset`; returns the QUEUED job."""
        request = _Requests.create(
            base_model, dataset, method=method, hyperparameters_=hyperparameters,
            output_model_id=output_model_id, job_id=job_id, labels=labels,
            dataset_format_=dataset_format, validate_only=validate_only, options=options, task=task,
        )  # fmt: skip
        return await self.call("CreateTrainingJob", request, lambda r: r.job, timeout=timeout)

    async def get_training_job(self, job: str) -> pb.TrainingJob:
        """Get one job."""
        return await self.call(
            "GetTrainingJob", pb.GetTrainingJobRequest(name=job_name(job)), lambda r: r.job
        )

    async def list_training_jobs_page(
        self, *, filter: str = "", page_size: int = 0, page_token: str = ""
    ) -> pb.ListTrainingJobsResponse:
        """One page of jobs, newest first."""
        request = pb.ListTrainingJobsRequest(filter=filter, page_size=page_size, page_token=page_token)
        return await self.call("ListTrainingJobs", request)

    async def list_training_jobs(
        self, *, filter: str = "", page_size: int = 100
    ) -> AsyncIterator[pb.TrainingJob]:
        """Iterate over all jobs matching `filter`, newest first, page by page."""
        token = ""
        while True:
            page = await self.list_training_jobs_page(filter=filter, page_size=page_size, page_token=token)
            for job in page.jobs:
                yield job
            token = page.next_page_token
            if not token:
                return

    async def list_training_metrics_page(
        self, job: str, *, page_size: int = 0, page_token: str = ""
    ) -> pb.ListTrainingMetricsResponse:
        """One page of a job's metric history, by step."""
        request = pb.ListTrainingMetricsRequest(
            parent=job_name(job), page_size=page_size, page_token=page_token
        )
        return await self.call("ListTrainingMetrics", request)

    async def list_training_metrics(self, job: str, *, page_size: int = 0) -> AsyncIterator[pb.MetricPoint]:
        """Iterate over a job's whole metric history, page by page."""
        token = ""
        while True:
            page = await self.list_training_metrics_page(job, page_size=page_size, page_token=token)
            for point in page.points:
                yield point
            token = page.next_page_token
            if not token:
                return

    async def cancel_training_job(self, job: str) -> pb.TrainingJob:
        """Cancel a queued or running job; returns the job after the request."""
        return await self.call(
            "CancelTrainingJob", pb.CancelTrainingJobRequest(name=job_name(job)), lambda r: r.job
        )

    def watch_training_job(
        self, job: str, *, timeout: float | None = None
    ) -> AsyncIterator[pb.WatchTrainingJobResponse]:
        """Stream the job's state changes, progress, evals and checkpoints until it ends (`async for`)."""
        return self.stream(
            "WatchTrainingJob", pb.WatchTrainingJobRequest(name=job_name(job)), timeout=timeout
        )

    async def wait_training_job(self, job: str, *, timeout: float | None = None) -> pb.TrainingJob:
        """Watch the job until it ends; returns it in its final state."""
        last = None
        async for event in self.watch_training_job(job, timeout=timeout):
            last = event.job
            if last.state in TERMINAL_STATES:
                return last
        return last if last is not None else await self.get_training_job(job)

    async def validate_dataset(
        self,
        dataset: str | pb.Dataset,
        *,
        method: MethodLike = pb.TRAINING_METHOD_LORA,
        base_model: str = "",
        max_seq_length: int | None = None,
        timeout: float | None = None,
    ) -> pb.ValidateDatasetResponse:
        """Check a dataset for a method without training (issues by row)."""
        request = _Requests.validate(dataset, method, base_model, max_seq_length)
        return await self.call("ValidateDataset", request, timeout=timeout)

    async def merge_adapter(
        self,
        adapter: str,
        *,
        output_model_id: str = "",
        validate_only: bool = False,
        timeout: float | None = 3600.0,
    ) -> str:
        """Merge a LoRA adapter into its base and register the result; returns its name."""
        request = pb.MergeAdapterRequest(
            adapter=model_name(adapter), output_model_id=output_model_id, validate_only=validate_only
        )
        return await self.call("MergeAdapter", request, lambda r: r.model, timeout=timeout)

    async def export_model(
        self,
        model: str,
        *,
        quantization: str = "f16",
        output_model_id: str = "",
        validate_only: bool = False,
        timeout: float | None = 3600.0,
    ) -> str:
        """Export a model to GGUF and register the file; returns the exported model's name."""
        request = _Requests.export(model, quantization, output_model_id, validate_only)
        return await self.call("ExportModel", request, lambda r: r.model, timeout=timeout)
