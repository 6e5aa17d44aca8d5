"""Test doubles at the edge: small inference and trainer servicers, and a thread running servers.

The fakes implement the generated base classes and run on real gRPC servers
(`server_kit.server.GrpcServer`: health, the error interceptor) on free ports,
so the clients under test go through the real wire, deadlines and status
details. They answer with fixed, predictable content; they are not the
services.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2
from grpc import aio

from modelyard.inference.v1 import inference_service_pb2 as ipb
from modelyard.inference.v1 import inference_service_pb2_grpc as ipb_grpc
from modelyard.trainer.v1 import trainer_service_pb2 as tpb
from modelyard.trainer.v1 import trainer_service_pb2_grpc as tpb_grpc
from server_kit import errors
from server_kit.server import GrpcServer

T = TypeVar("T")


class ServerThread:
    """An event loop in a thread that runs gRPC servers, so sync tests and the CLI can call them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-servers", daemon=True)
        self._thread.start()
        self.servers: list[GrpcServer] = []

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        """Run `coro` on the servers' loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, app: Any, address: str = "127.0.0.1:0") -> GrpcServer:
        """Start `app` (a `ServiceApp`) on `address` (a free port by default); returns the started server."""
        server = GrpcServer(app, address, grace_seconds=0.0, drain_seconds=0.0)
        self.run(server.start())
        self.servers.append(server)
        return server

    def stop(self, server: GrpcServer) -> None:
        """Stop one server now (its port refuses connections afterwards)."""
        self.run(server.stop(0.0))

    def close(self) -> None:
        """Stop every server and the loop."""
        for server in reversed(self.servers):
            self.run(server.stop(0.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


class ServicerApp:
    """A `ServiceApp` around one servicer, for `GrpcServer`."""

    def __init__(self, service_name: str, servicer: Any, add: Callable[[Any, aio.Server], None]) -> None:
        self.service_names = (service_name,)
        self.servicer = servicer
        self._add = add

    async def start(self) -> None:
        return None

    def add_to_server(self, server: aio.Server) -> None:
        self._add(self.servicer, server)

    async def on_serving(self, port: int) -> None:
        return None

    async def stop(self) -> None:
        return None


# ---- inference --------------------------------------------------------------------------------------


class FakeInferenceWorker(ipb_grpc.InferenceServiceServicer):
    """Answers every prompt with `text` (word by word when streaming) and records the requests.

    `models/missing` is NOT_FOUND with the service's reason and metadata; the
    prompt `!refuse` is FAILED_PRECONDITION (an answer, not an outage). With
    `hold_streams` set, a stream sends its first delta and then waits until the
    client cancels; `stream_cancelled` is set when that happens.
    """

    def __init__(self, text: str = "hello from the fake worker") -> None:
        self.text = text
        self.requests: list[Any] = []
        self.hold_streams = False
        self.stream_cancelled = asyncio.Event()
        self.loaded: dict[str, ipb.LoadedModel] = {}

    def _check(self, model: str) -> None:
        if model == "models/missing":
            raise errors.NotFound(
                f"model {model} is not in the catalog", reason="MODEL_NOT_FOUND", metadata={"model": model}
            )
        if not model:
            raise errors.InvalidArgument(
                "model is required",
                reason="MISSING_FIELD",
                violations=[errors.FieldViolation("model", "required")],
            )

    def _usage(self) -> ipb.Usage:
        words = len(self.text.split())
        return ipb.Usage(prompt_tokens=3, completion_tokens=words, total_tokens=3 + words)

    async def Generate(
        self, request: ipb.GenerateRequest, context: aio.ServicerContext
    ) -> ipb.GenerateResponse:
        self.requests.append(request)
        self._check(request.model)
        if request.prompt == "!refuse":
            raise errors.FailedPrecondition("this worker refuses the prompt", reason="PROMPT_REFUSED")
        n = request.sampling.n if request.sampling.HasField("n") else 1
        return ipb.GenerateResponse(
            request_id=request.request_id or "fake-request",
            model=request.model,
            completions=[
                ipb.Completion(index=i, text=self.text, finish_reason=ipb.FINISH_REASON_LENGTH)
                for i in range(n)
            ],
            usage=self._usage(),
        )

    async def StreamGenerate(
        self, request: ipb.StreamGenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[ipb.StreamGenerateResponse]:
        self.requests.append(request)
        self._check(request.model)
        words = self.text.split(" ")
        request_id = request.request_id or "fake-request"
        try:
            for index, word in enumerate(words):
                last = index == len(words) - 1
                delta = ipb.StreamGenerateResponse(
                    request_id=request_id, text=word if index == 0 else " " + word, token_ids=[index]
                )
                if last:
                    delta.finish_reason = ipb.FINISH_REASON_LENGTH
                    delta.usage.CopyFrom(self._usage())
                yield delta
                if self.hold_streams:
                    await asyncio.Event().wait()  # until the client cancels
        except asyncio.CancelledError:
            self.stream_cancelled.set()
            raise

    def _answer(self, messages: Sequence[ipb.ChatMessage]) -> str:
        users = [m.content for m in messages if m.role == "user"]
        systems = [m.content for m in messages if m.role == "system"]
        prefix = f"[{systems[0]}] " if systems else ""
        return f"{prefix}echo {len(users)}: {users[-1] if users else ''}"

    async def Chat(self, request: ipb.ChatRequest, context: aio.ServicerContext) -> ipb.ChatResponse:
        self.requests.append(request)
        self._check(request.model)
        return ipb.ChatResponse(
            request_id=request.request_id or "fake-request",
            model=request.model,
            choices=[
                ipb.ChatChoice(
                    index=0,
                    message=ipb.ChatMessage(role="assistant", content=self._answer(request.messages)),
                    finish_reason=ipb.FINISH_REASON_STOP,
                )
            ],
            usage=self._usage(),
        )

    async def StreamChat(
        self, request: ipb.StreamChatRequest, context: aio.ServicerContext
    ) -> AsyncIterator[ipb.StreamChatResponse]:
        self.requests.append(request)
        self._check(request.model)
        answer = self._answer(request.messages)
        middle = len(answer) // 2
        yield ipb.StreamChatResponse(request_id="fake-request", content=answer[:middle])
        yield ipb.StreamChatResponse(
            request_id="fake-request",
            content=answer[middle:],
            finish_reason=ipb.FINISH_REASON_STOP,
            usage=self._usage(),
        )

    async def LoadModel(
        self, request: ipb.LoadModelRequest, context: aio.ServicerContext
    ) -> ipb.LoadModelResponse:
        self._check(request.model)
        loaded = ipb.LoadedModel(
            model=request.model,
            engine="fake",
            state=ipb.LOADED_MODEL_STATE_READY,
            max_model_len=request.max_model_len if request.HasField("max_model_len") else 2048,
        )
        self.loaded[request.model] = loaded
        return ipb.LoadModelResponse(loaded_model=loaded)

    async def UnloadModel(
        self, request: ipb.UnloadModelRequest, context: aio.ServicerContext
    ) -> ipb.UnloadModelResponse:
        if self.loaded.pop(request.model, None) is None:
            raise errors.NotFound(f"{request.model} is not loaded", reason="MODEL_NOT_LOADED")
        return ipb.UnloadModelResponse()

    async def ListLoadedModels(
        self, request: ipb.ListLoadedModelsRequest, context: aio.ServicerContext
    ) -> ipb.ListLoadedModelsResponse:
        return ipb.ListLoadedModelsResponse(loaded_models=list(self.loaded.values()))

    async def GetServerInfo(
        self, request: ipb.GetServerInfoRequest, context: aio.ServicerContext
    ) -> ipb.GetServerInfoResponse:
        response = ipb.GetServerInfoResponse(version="test", worker_id="fake", max_concurrent_requests=4)
        response.capabilities.engine = "fake"
        response.loaded_models.extend(self.loaded.values())
        return response


def inference_app(worker: FakeInferenceWorker) -> ServicerApp:
    """A `ServiceApp` serving `worker` as `modelyard.inference.v1.InferenceService`."""
    return ServicerApp(
        "modelyard.inference.v1.InferenceService", worker, ipb_grpc.add_InferenceServiceServicer_to_server
    )


# ---- trainer ------------------------------------------------------------------------------------------


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


class FakeTrainer(tpb_grpc.TrainerServiceServicer):
    """Keeps jobs in memory; watching a job replays a scripted run of `steps` steps.

    The run: RUNNING, one PROGRESS event per step with a falling loss, an EVAL
    event every `eval_every` steps, a CHECKPOINT at the end, then SUCCEEDED
    with `models/{output}` (or FAILED when the job's label `fail` is set).
    """

    def __init__(self, steps: int = 6, eval_every: int = 3) -> None:
        self.steps = steps
        self.eval_every = eval_every
        self.jobs: dict[str, tpb.TrainingJob] = {}
        self.requests: list[Any] = []

    def _get(self, name: str) -> tpb.TrainingJob:
        if name not in self.jobs:
            raise errors.NotFound(
                f"training job {name} not found", reason="JOB_NOT_FOUND", metadata={"job": name}
            )
        return self.jobs[name]

    async def CreateTrainingJob(
        self, request: tpb.CreateTrainingJobRequest, context: aio.ServicerContext
    ) -> tpb.CreateTrainingJobResponse:
        self.requests.append(request)
        if not request.job.dataset.source:
            raise errors.InvalidArgument(
                "dataset.source is required",
                reason="MISSING_FIELD",
                violations=[errors.FieldViolation("job.dataset.source", "required")],
            )
        job = tpb.TrainingJob()
        job.CopyFrom(request.job)
        job.name = f"trainingJobs/{request.job_id or f'job-{len(self.jobs) + 1}'}"
        job.state = tpb.TRAINING_JOB_STATE_QUEUED
        job.create_time.CopyFrom(_now())
        if not job.output_model_id:
            job.output_model_id = f"{job.base_model.removeprefix('models/')}-ft-1"
        if not request.validate_only:
            self.jobs[job.name] = job
        return tpb.CreateTrainingJobResponse(job=job)

    async def GetTrainingJob(
        self, request: tpb.GetTrainingJobRequest, context: aio.ServicerContext
    ) -> tpb.GetTrainingJobResponse:
        return tpb.GetTrainingJobResponse(job=self._get(request.name))

    async def ListTrainingJobs(
        self, request: tpb.ListTrainingJobsRequest, context: aio.ServicerContext
    ) -> tpb.ListTrainingJobsResponse:
        self.requests.append(request)
        jobs = sorted(self.jobs.values(), key=lambda j: j.name, reverse=True)
        if request.filter:
            wanted = request.filter.split("=", 1)[1].strip().strip('"')
            jobs = [j for j in jobs if tpb.TrainingJobState.Name(j.state).endswith(wanted)]
        start = int(request.page_token or 0)
        size = request.page_size or 50
        page = jobs[start : start + size]
        token = str(start + size) if start + size < len(jobs) else ""
        return tpb.ListTrainingJobsResponse(jobs=page, next_page_token=token)

    async def CancelTrainingJob(
        self, request: tpb.CancelTrainingJobRequest, context: aio.ServicerContext
    ) -> tpb.CancelTrainingJobResponse:
        job = self._get(request.name)
        job.state = tpb.TRAINING_JOB_STATE_CANCELLED
        return tpb.CancelTrainingJobResponse(job=job)

    def script(self, job: tpb.TrainingJob) -> list[tpb.WatchTrainingJobResponse]:
        """The events of the scripted run."""
        events = []

        def event(kind: tpb.TrainingEventType.ValueType) -> None:
            snapshot = tpb.TrainingJob()
            snapshot.CopyFrom(job)
            events.append(tpb.WatchTrainingJobResponse(event_type=kind, job=snapshot))

        job.state = tpb.TRAINING_JOB_STATE_RUNNING
        job.progress.total_steps = self.steps
        event(tpb.TRAINING_EVENT_TYPE_STATE_CHANGED)
        for step in range(1, self.steps + 1):
            job.progress.step = step
            job.progress.loss = 3.0 / step
            job.progress.learning_rate = 2e-4
            job.progress.eta.CopyFrom(duration_pb2.Duration(seconds=self.steps - step))
            event(tpb.TRAINING_EVENT_TYPE_PROGRESS)
            if step % self.eval_every == 0:
                job.progress.eval_loss = 3.5 / step
                job.progress.eval_perplexity = 2.0
                event(tpb.TRAINING_EVENT_TYPE_EVAL)
        job.checkpoint_path = f"/checkpoints/{job.name}/checkpoint-{self.steps}"
        event(tpb.TRAINING_EVENT_TYPE_CHECKPOINT)
        if "fail" in job.labels:
            job.state = tpb.TRAINING_JOB_STATE_FAILED
            job.error.reason = "TRAINING_DIVERGED"
            job.error.message = "loss became NaN at step 6"
        else:
            job.state = tpb.TRAINING_JOB_STATE_SUCCEEDED
            job.output_model = f"models/{job.output_model_id}"
        event(tpb.TRAINING_EVENT_TYPE_STATE_CHANGED)
        return events

    async def WatchTrainingJob(
        self, request: tpb.WatchTrainingJobRequest, context: aio.ServicerContext
    ) -> AsyncIterator[tpb.WatchTrainingJobResponse]:
        job = self._get(request.name)
        if job.state in (tpb.TRAINING_JOB_STATE_SUCCEEDED, tpb.TRAINING_JOB_STATE_FAILED):
            yield tpb.WatchTrainingJobResponse(event_type=tpb.TRAINING_EVENT_TYPE_STATE_CHANGED, job=job)
            return
        for event in self.script(job):
            yield event

    async def ValidateDataset(
        self, request: tpb.ValidateDatasetRequest, context: aio.ServicerContext
    ) -> tpb.ValidateDatasetResponse:
        self.requests.append(request)
        return tpb.ValidateDatasetResponse(valid=True, format=tpb.DATASET_FORMAT_CHAT, num_rows=12)


def trainer_app(trainer: FakeTrainer) -> ServicerApp:
    """A `ServiceApp` serving `trainer` as `modelyard.trainer.v1.TrainerService`."""
    return ServicerApp(
        "modelyard.trainer.v1.TrainerService", trainer, tpb_grpc.add_TrainerServiceServicer_to_server
    )
