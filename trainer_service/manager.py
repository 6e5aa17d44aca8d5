"""The job manager: create, schedule, run, watch, cancel and recover training jobs.

`JobManager` is the trainer's domain core (no gRPC). It owns:

- creation: the request is checked before any compute is spent: method and
  hyperparameters, the base model (READY in the catalog, an LLM, not an
  adapter, compatible with this trainer's engine spec, its files visible
  here, its config loading as a real transformers config object), the dataset
  (format fits the method, every row checked with the model's tokenizer and
  chat template). Then the job is stored QUEUED.
- the scheduler: claims queued jobs atomically from the shared store (at most
  `max_concurrent_jobs` at once) and runs each in a worker process
  (`runner.WorkerProcess`); worker events become stored progress and watch
  events; the job's claim (lease) is renewed while it runs, and a cancel
  flagged in the store by another trainer reaches the worker.
- results: a finished job's output is registered in the catalog
  (`ImportModel` with `parent` = base model and `training_job` = the job) and
  the job ends SUCCEEDED with `output_model` set.
- watchers: an asyncio broadcaster per job; a watch starts with the current
  state, can join midway, and ends with the final state. Jobs run by another
  trainer process are followed by re-reading the store every `poll_seconds`.
- recovery: at start, jobs this trainer left RUNNING (it was killed) are
  resumed from their last complete checkpoint (re-queued, `resume_count` + 1),
  or FAILED with reason TRAINER_RESTARTED when they have none (or
  TOO_MANY_RESTARTS after `max_resumes`). The same happens to a job whose
  worker process dies (WORKER_CRASHED) and, on any trainer, to a job whose
  owner stopped renewing its lease (TRAINER_LOST).
- shutdown: running jobs are preempted (checkpoint, then back to QUEUED) so a
  restart or another trainer resumes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import grpc

from clients.errors import ModelyardRpcError
from modelyard.catalog.v1 import model_pb2, worker_pb2
from modelyard.trainer.v1 import trainer_service_pb2 as pb
from server_kit.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    ModelyardError,
    NotFound,
    Unavailable,
)
from trainer_service import datasets as ds
from trainer_service import hyperparams, jobs
from trainer_service.admission import Admission
from trainer_service.evaluation import eval_metrics_of
from trainer_service.job_checks import catalog_error, check_task, reward_model_path, task_name
from trainer_service.jobs import ClaimedJob, JobStore, job_id_of, job_name, method_name, state_name
from trainer_service.metric_store import MetricStore
from trainer_service.rewards import required_fields
from trainer_service.runner import JobPaths, WorkerEvent, WorkerProcess, WorkerSpec
from trainer_service.strategies import strategy_for
from trainer_service.strategies.base import find_complete_checkpoint

log = logging.getLogger("modelyard.trainer")

MODEL_ID_PATTERN = jobs.JOB_ID_PATTERN  # the catalog's id rule: ^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$
STATE_CHANGED = pb.TRAINING_EVENT_TYPE_STATE_CHANGED
PROGRESS = pb.TRAINING_EVENT_TYPE_PROGRESS
EVAL = pb.TRAINING_EVENT_TYPE_EVAL
CHECKPOINT = pb.TRAINING_EVENT_TYPE_CHECKPOINT
STEP_METRICS = ("loss", "learning_rate", "samples_per_second", "tokens_per_second", "eta")


class Catalog(Protocol):
    """What the manager needs from the catalog (`clients.catalog.AsyncCatalogClient` has it)."""

    async def get_model(self, model: str) -> model_pb2.Model:
        """Get one model."""

    async def check_compatibility(
        self, model: str, *, worker: str = "", engine_spec: worker_pb2.EngineSpec | None = None
    ) -> worker_pb2.CompatibilityReport:
        """Check a model against an engine spec."""

    async def import_model(
        self, source: str, *, timeout: float | None = 600.0, **kwargs: Any
    ) -> model_pb2.Model:
        """Import a folder as a model."""


@dataclass
class ManagerConfig:
    """How the manager runs jobs."""

    data_dir: Path
    worker_id: str
    engine_spec: worker_pb2.EngineSpec
    max_concurrent_jobs: int = 1
    num_processes: int = 1
    lease_seconds: float = 60.0
    poll_seconds: float = 2.0
    max_resumes: int = 3
    preempt_seconds: float = 30.0
    dataset_roots: list[Path] = field(default_factory=list)
    datasets_cache: Path | None = None
    allow_remote_code: bool = False
    python: str = sys.executable


@dataclass(frozen=True)
class JobEvent:
    """One update of a watched job."""

    type: int
    job: pb.TrainingJob


class JobEvents:
    """In-process broadcaster of job events to watchers (one bounded queue per watcher)."""

    def __init__(self, queue_size: int = 256) -> None:
        self.queue_size = queue_size
        self._subscribers: dict[str, set[asyncio.Queue[JobEvent]]] = {}

    def publish(self, event_type: int, job: pb.TrainingJob) -> None:
        """Send `job` to the watchers of its id; a full queue drops the event (the watcher re-reads)."""
        for queue in self._subscribers.get(job.name.removeprefix("trainingJobs/"), ()):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(JobEvent(event_type, job))

    @contextlib.contextmanager
    def subscribe(self, job_id: str) -> Iterator[asyncio.Queue[JobEvent]]:
        """A queue receiving the events of `job_id` while the block runs."""
        queue: asyncio.Queue[JobEvent] = asyncio.Queue(self.queue_size)
        self._subscribers.setdefault(job_id, set()).add(queue)
        try:
            yield queue
        finally:
            subscribers = self._subscribers.get(job_id)
            if subscribers is not None:
                subscribers.discard(queue)
                if not subscribers:
                    del self._subscribers[job_id]


@dataclass
class _Running:
    """A job this trainer runs now."""

    job_id: str
    task: asyncio.Task[None] | None = None
    process: WorkerProcess | None = None


def _method(value: int, field_name: str = "job.method") -> ds.Method:
    if value == pb.TRAINING_METHOD_UNSPECIFIED or value not in pb.TrainingMethod.values():
        names = ", ".join(m.value for m in ds.Method)
        raise InvalidArgument(
            f"method is required: one of {names}",
            reason="MISSING_FIELD" if value == 0 else "INVALID_METHOD",
            violations=[FieldViolation(field_name, f"set TRAINING_METHOD_ + one of {names}")],
        )
    return ds.Method(method_name(value))


def format_value(fmt: ds.DatasetFormat) -> pb.DatasetFormat.ValueType:
    """The proto `DatasetFormat` value of `fmt`."""
    return pb.DatasetFormat.Value(f"DATASET_FORMAT_{fmt.value}")


def _change_kind(old: pb.TrainingJob, new: pb.TrainingJob) -> int:
    """The event type that describes the change from `old` to `new` (read from the store)."""
    if new.state != old.state or new.resume_count != old.resume_count:
        return STATE_CHANGED
    if new.checkpoint_path != old.checkpoint_path:
        return CHECKPOINT
    if new.progress.eval_loss != old.progress.eval_loss:
        return EVAL
    return PROGRESS


def default_output_model_id(base_model: str, now: datetime) -> str:
    """`{base}-ft-{timestamp}-{4 hex}`, the base shortened so the id stays within 63 characters.

    The random part keeps two jobs queued in the same second apart.
    """
    suffix = f"-ft-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    base = base_model.removeprefix("models/")[: 63 - len(suffix)].rstrip("-")
    return f"{base}{suffix}"


class JobManager:
    """Creates, schedules, runs and watches training jobs (see the module docstring)."""

    def __init__(self, store: JobStore, catalog: Catalog | None, config: ManagerConfig) -> None:
        self.store = store
        self.metrics = MetricStore(store.engine, clock=store.clock)
        self.catalog = catalog
        self.config = config
        self.events = JobEvents()
        self._running: dict[str, _Running] = {}
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._scheduler: asyncio.Task[None] | None = None
        self.admission = Admission(catalog, config)
        self.queued_count = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Recover jobs this trainer left RUNNING, then start the scheduler."""
        await self.recover()
        self._scheduler = asyncio.create_task(self._schedule(), name="trainer-scheduler")

    async def stop(self) -> None:
        """Stop scheduling; preempt running jobs (checkpoint, back to QUEUED), killing what does not stop."""
        self._stopping = True
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
        runs = list(self._running.values())
        for run in runs:
            if run.process is not None:
                run.process.request_stop("preempt")
        tasks = [run.task for run in runs if run.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.config.preempt_seconds)
            for task in pending:
                task.cancel()
            for run in runs:
                if run.process is not None:
                    run.process.kill()  # left RUNNING: recovered at the next start, or by another trainer
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*pending, return_exceptions=True)

    @property
    def running_jobs(self) -> list[str]:
        """Ids of the jobs this trainer runs now."""
        return list(self._running)

    def worker_pid(self, job_id: str) -> int | None:
        """Process id of the worker training `job_id` here, when there is one."""
        run = self._running.get(job_id)
        return run.process.pid if run is not None and run.process is not None else None

    # ------------------------------------------------------------------ create / read

    async def create(
        self, job_id: str, request: pb.TrainingJob, *, validate_only: bool = False
    ) -> pb.TrainingJob:
        """Check everything about a job request, then queue it (or only check, with `validate_only`)."""
        method = _method(request.method)
        if job_id:
            jobs.check_job_id(job_id)
            with contextlib.suppress(NotFound):
                await asyncio.to_thread(self.store.get, job_id)
                raise AlreadyExists(
                    f"training job {job_name(job_id)} already exists",
                    reason="JOB_ALREADY_EXISTS",
                    metadata={"job": job_name(job_id)},
                )
        else:
            job_id = jobs.new_job_id(request.method)
        if request.output_model_id and not MODEL_ID_PATTERN.match(request.output_model_id):
            raise InvalidArgument(
                f"output_model_id {request.output_model_id!r} must match {MODEL_ID_PATTERN.pattern}",
                reason="INVALID_ID",
                violations=[FieldViolation("job.output_model_id", f"must match {MODEL_ID_PATTERN.pattern}")],
            )
        strategy_for(method).validate()  # e.g. QLoRA off CUDA: FAILED_PRECONDITION
        hyper = hyperparams.resolve(method, request.hyperparameters)
        if not request.base_model:
            raise InvalidArgument(
                "base_model is required (models/{model})",
                reason="MISSING_FIELD",
                violations=[FieldViolation("job.base_model", "required")],
            )
        base = await self.admission.usable_model(request.base_model)
        context = base.llm.context_length if base.llm.HasField("context_length") else None
        if context is not None:
            if not request.hyperparameters.HasField("max_seq_length"):
                hyper.max_seq_length = min(hyper.max_seq_length, context)
            elif hyper.max_seq_length > context:
                raise InvalidArgument(
                    f"max_seq_length {hyper.max_seq_length} exceeds the context length {context} "
                    f"of {base.name}",
                    reason="SEQUENCE_TOO_LONG",
                    violations=[
                        FieldViolation("job.hyperparameters.max_seq_length", f"must be <= {context}")
                    ],
                )
        dataset = request.dataset
        reward_model = ""
        if hyper.grpo_reward_model:
            reward = await self.admission.usable_model(
                hyper.grpo_reward_model, field_name="job.hyperparameters.grpo.reward_model", reward=True
            )
            hyper.grpo_reward_model, reward_model = reward.name, reward.local_path
        extra_fields = required_fields(hyper.grpo_reward_functions) if method == ds.Method.GRPO else ()
        validated = await self.admission.validate(
            dataset, method, Path(base.local_path), hyper.max_seq_length, extra_fields=extra_fields
        )
        validated.report.raise_if_invalid()
        check_task(request.task, method, validated.format)
        eval_rows = ds.eval_row_count(validated.report.num_rows, hyper.eval_split)

        output_model_id = request.output_model_id or default_output_model_id(base.name, datetime.now(UTC))
        await self.admission.check_output_free(output_model_id)
        source = self.admission.stored_source(dataset.source)
        job = pb.TrainingJob(
            name=job_name(job_id),
            base_model=base.name,
            dataset=pb.Dataset(source=source, format=format_value(validated.format), split=dataset.split),
            method=request.method,
            hyperparameters=hyper.to_proto(method),
            output_model_id=output_model_id,
            labels=dict(request.labels),
            task=request.task,
            train_row_count=validated.report.num_rows - eval_rows,
            eval_row_count=eval_rows,
        )
        if validate_only:
            return job
        spec = {
            "base_model_path": base.local_path,
            "hyperparameters": hyper.to_dict(),
            "train_rows": validated.report.num_rows,
            "reward_model_path": reward_model,
        }
        created = await asyncio.to_thread(self.store.create, job_id, job, spec)
        log.info("queued %s: %s of %s on %s", created.name, method.value, base.name, source)
        self.events.publish(STATE_CHANGED, created)
        self._wakeup.set()
        return created

    async def get(self, name: str) -> pb.TrainingJob:
        """One job by name."""
        return await asyncio.to_thread(self.store.get, job_id_of(name))

    async def list_jobs(
        self, *, page_size: int = 0, page_token: str = "", filter: str = ""
    ) -> tuple[list[pb.TrainingJob], str]:
        """One page of jobs, newest first."""
        return await asyncio.to_thread(
            self.store.list_jobs, page_size=page_size, page_token=page_token, filter=filter
        )

    async def cancel(self, name: str) -> pb.TrainingJob:
        """Cancel a job: QUEUED ends at once; RUNNING stops after its current step, keeping a checkpoint."""
        job_id = job_id_of(name)
        job = await asyncio.to_thread(self.store.request_cancel, job_id)
        if job.state == jobs.CANCELLED:
            self.events.publish(STATE_CHANGED, job)
        run = self._running.get(job_id)
        if run is not None and run.process is not None:
            run.process.request_stop("cancel")
        # A job running on another trainer sees the flag at its next lease renewal.
        return job

    async def list_metrics(
        self, parent: str, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[pb.MetricPoint], str]:
        """One page of a job's metric history (every logged step and evaluation), by step."""
        job_id = job_id_of(parent, "parent")
        await asyncio.to_thread(self.store.get, job_id)  # NOT_FOUND for an unknown job
        return await asyncio.to_thread(
            self.metrics.list_points, job_id, page_size=page_size, page_token=page_token
        )

    async def watch(self, name: str) -> AsyncIterator[JobEvent]:
        """The job's current state, then every change until it ends."""
        job_id = job_id_of(name)
        with self.events.subscribe(job_id) as queue:
            job = await asyncio.to_thread(self.store.get, job_id)
            yield JobEvent(STATE_CHANGED, job)
            last = job
            while last.state not in jobs.TERMINAL_STATES:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=self.config.poll_seconds)
                except TimeoutError:
                    if job_id in self._running:
                        continue  # every change of a job running here is published
                    # The job is queued, or runs on another trainer: look at the store.
                    fresh = await asyncio.to_thread(self.store.get, job_id)
                    event = JobEvent(_change_kind(last, fresh), fresh)
                if event.job == last:
                    continue  # already sent (the snapshot, or seen in the store first)
                if event.job.state == last.state and event.job.progress.step < last.progress.step:
                    continue  # published before the snapshot we already sent
                last = event.job
                yield event

    async def validate_dataset(
        self, dataset: pb.Dataset, method_value: int, base_model: str, max_seq_length: int | None
    ) -> tuple[ds.DatasetReport, ds.DatasetFormat]:
        """Check a dataset for a method (and a base model's tokenizer when given) without training."""
        method = _method(method_value, "method")
        limit = max_seq_length if max_seq_length is not None else ds.DEFAULT_MAX_SEQ_LENGTH
        if max_seq_length is not None and max_seq_length < 1:
            raise InvalidArgument(
                "max_seq_length must be >= 1",
                reason="INVALID_ARGUMENT",
                violations=[FieldViolation("max_seq_length", "must be >= 1")],
            )
        if not base_model:
            validated = await self.admission.validate(dataset, method, None, limit)
            return validated.report, validated.format
        base = await self.admission.usable_model(base_model, field_name="base_model")
        if max_seq_length is None and base.llm.HasField("context_length"):
            limit = min(limit, base.llm.context_length)
        validated = await self.admission.validate(dataset, method, Path(base.local_path), limit)
        return validated.report, validated.format

    # ------------------------------------------------------------------ scheduling

    async def _schedule(self) -> None:
        """Claim and start queued jobs while there is room; recover jobs of lost trainers."""
        while not self._stopping:
            try:
                await self._recover_lapsed()
                while len(self._running) < self.config.max_concurrent_jobs and not self._stopping:
                    claimed = await asyncio.to_thread(
                        self.store.claim_next, self.config.worker_id, self.config.lease_seconds
                    )
                    if claimed is None:
                        break
                    run = _Running(claimed.job_id)
                    self._running[claimed.job_id] = run
                    run.task = asyncio.create_task(self._run(claimed, run), name=f"job-{claimed.job_id}")
                counts = await asyncio.to_thread(self.store.count_by_state)
                self.queued_count = counts.get("QUEUED", 0)
            except asyncio.CancelledError:
                raise
            except ModelyardError as error:
                log.warning("scheduler: %s (%s); retrying", error.message, error.reason)
            except Exception:
                log.exception("scheduler iteration failed; retrying")
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self.config.poll_seconds)

    async def _run(self, claimed: ClaimedJob, run: _Running) -> None:
        job_id = claimed.job_id
        try:
            self.events.publish(STATE_CHANGED, claimed.job)
            await self._execute(claimed, run)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.exception("job %s: the trainer failed running it", job_id)
            if run.process is not None:
                run.process.kill()
            await self._finish(job_id, jobs.FAILED, reason="INTERNAL", message=f"the trainer failed: {error}")
        finally:
            self._running.pop(job_id, None)
            self._wakeup.set()

    async def _execute(self, claimed: ClaimedJob, run: _Running) -> None:
        job, spec, job_id = claimed.job, claimed.spec, claimed.job_id
        paths = JobPaths.of(self.config.data_dir, job_id)
        checkpoint = await asyncio.to_thread(find_complete_checkpoint, paths.checkpoints)
        if paths.output.exists():
            await asyncio.to_thread(shutil.rmtree, paths.output, True)
        worker_spec = WorkerSpec(
            job_id=job_id,
            method=method_name(job.method),
            base_model_path=spec["base_model_path"],
            dataset_source=job.dataset.source,
            dataset_format=pb.DatasetFormat.Name(job.dataset.format).removeprefix("DATASET_FORMAT_"),
            dataset_split=job.dataset.split,
            hyperparameters=spec["hyperparameters"],
            output_dir=str(paths.output),
            checkpoints_dir=str(paths.checkpoints),
            control_file=str(paths.control),
            resume_from=str(checkpoint) if checkpoint else "",
            datasets_cache=str(self.config.datasets_cache or ""),
            allow_remote_code=self.config.allow_remote_code,
            extra={"task": task_name(job.task), "reward_model_path": reward_model_path(spec)},
        )
        process = WorkerProcess(
            paths, worker_spec, python=self.config.python, num_processes=self.config.num_processes
        )
        await process.start()
        run.process = process
        log.info(
            "job %s: running (%s)%s", job_id, method_name(job.method),
            f", resuming from {checkpoint.name}" if checkpoint else "",
        )  # fmt: skip
        lease = asyncio.create_task(self._keep_lease(job_id, process), name=f"lease-{job_id}")
        ended = False
        try:
            async for event in process.events():
                if await self._handle(job_id, job, event, process):
                    ended = True
                    lease.cancel()  # the job left RUNNING: nothing to renew
            code = await process.wait()
        finally:
            lease.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lease
            process.kill()  # no-op once it exited; stops it when this task is cancelled
            process.close()
        if not ended:
            await self._recover(
                job_id,
                "WORKER_CRASHED",
                f"the training process exited with status {code} without a result; log tail: "
                + process.log_tail(600),
            )

    async def _keep_lease(self, job_id: str, process: WorkerProcess) -> None:
        """Renew the job's lease every lease/3; pass on cancels flagged by other trainers."""
        interval = max(self.config.lease_seconds / 3.0, 0.2)
        while True:
            try:
                lease = await asyncio.to_thread(
                    self.store.renew_lease, job_id, self.config.worker_id, self.config.lease_seconds
                )
            except ModelyardError as error:
                log.warning("job %s: lease renewal failed: %s", job_id, error.message)
            else:
                if not lease.owned:
                    log.warning("job %s: this trainer lost its claim on the job; stopping the worker", job_id)
                    process.kill()
                    return
                if lease.cancel_requested:
                    process.request_stop("cancel")
            await asyncio.sleep(interval)

    async def _handle(
        self, job_id: str, job: pb.TrainingJob, event: WorkerEvent, process: WorkerProcess
    ) -> bool:
        """Store and broadcast one worker event; True when it ended the job."""
        data = event.data
        if event.type in ("started", "progress"):
            progress = pb.TrainingProgress(
                step=int(data.get("step", 0)), total_steps=int(data.get("total_steps", 0))
            )
            if "epoch" in data:
                progress.epoch = float(data["epoch"])
            for name in ("loss", "learning_rate", "samples_per_second", "tokens_per_second"):
                if data.get(name) is not None:
                    setattr(progress, name, float(data[name]))
            if data.get("eta_seconds") is not None:
                progress.eta.FromNanoseconds(int(float(data["eta_seconds"]) * 1e9))
            # A (re)started run has no step metrics yet: drop those of the previous run.
            reset = STEP_METRICS if event.type == "started" else ()
            if event.type == "progress":
                await self._record_point(job_id, pb.METRIC_KIND_TRAIN, data)
            await self._progress(job_id, PROGRESS, progress, process=process, reset=reset)
        elif event.type == "eval":
            progress = pb.TrainingProgress()
            if data.get("eval_loss") is not None:
                progress.eval_loss = float(data["eval_loss"])
            if data.get("eval_perplexity") is not None:
                progress.eval_perplexity = float(data["eval_perplexity"])
            progress.eval_metrics.update(
                {k: float(v) for k, v in dict(data.get("task_metrics") or {}).items()}
            )
            await self._record_point(job_id, pb.METRIC_KIND_EVAL, data)
            await self._progress(job_id, EVAL, progress, process=process)
        elif event.type == "checkpoint":
            await self._progress(
                job_id, CHECKPOINT, None, checkpoint=str(data.get("path", "")), process=process
            )
        elif event.type == "stopped":
            if data.get("reason") == "preempt":
                requeued = await asyncio.to_thread(
                    self.store.requeue, job_id, self.config.worker_id, resumed=False
                )
                if requeued is not None:
                    log.info("job %s: preempted at a checkpoint; queued to resume", job_id)
                    self.events.publish(STATE_CHANGED, requeued)
            else:
                await self._finish(job_id, jobs.CANCELLED)
            return True
        elif event.type == "finished":
            await self._succeed(job_id, job, Path(str(data["output_dir"])), dict(data.get("metrics") or {}))
            return True
        elif event.type == "failed":
            await self._finish(
                job_id, jobs.FAILED, reason=str(data.get("reason") or "TRAINING_FAILED"),
                message=str(data.get("message") or ""),
            )  # fmt: skip
            return True
        return False

    async def _record_point(self, job_id: str, kind: pb.MetricKind.ValueType, data: dict[str, Any]) -> None:
        """Keep a logged step's metrics in the job's history (a failure to do so only logs)."""
        values = {
            k: float(v) for k, v in dict(data.get("metrics") or {}).items() if isinstance(v, int | float)
        }
        if data.get("eval_perplexity") is not None:
            values["eval_perplexity"] = float(data["eval_perplexity"])
        if not values:
            return
        try:
            await asyncio.to_thread(
                self.metrics.record,
                job_id,
                kind,
                int(data.get("step", 0)),
                float(data.get("epoch") or 0.0),
                values,
            )
        except ModelyardError as error:
            log.warning("job %s: metric history not recorded: %s", job_id, error.message)

    async def _progress(
        self,
        job_id: str,
        event_type: int,
        progress: pb.TrainingProgress | None,
        *,
        checkpoint: str | None = None,
        process: WorkerProcess,
        reset: tuple[str, ...] = (),
    ) -> None:
        updated = await asyncio.to_thread(
            self.store.record_progress, job_id, self.config.worker_id, progress,
            checkpoint_path=checkpoint, reset=reset,
        )  # fmt: skip
        if updated is None:
            log.warning("job %s: no longer owned by this trainer; stopping its worker", job_id)
            process.kill()
            return
        self.events.publish(event_type, updated)

    async def _succeed(
        self, job_id: str, job: pb.TrainingJob, output_dir: Path, metrics: dict[str, Any]
    ) -> None:
        try:
            output_model = await self._register_with_retries(job, output_dir, metrics)
        except ModelyardError as error:
            log.warning("job %s: trained, but registering %s failed: %s", job_id, output_dir, error.message)
            await self._finish(
                job_id, jobs.FAILED, reason="REGISTRATION_FAILED",
                message=f"training finished but the catalog did not register {output_dir}: {error.message}",
            )  # fmt: skip
            return
        await self._finish(job_id, jobs.SUCCEEDED, output_model=output_model)
        log.info("job %s: SUCCEEDED, registered %s", job_id, output_model)

    async def _register_with_retries(
        self, job: pb.TrainingJob, output_dir: Path, metrics: dict[str, Any], attempts: int = 5
    ) -> str:
        """`_register`, retried with back-off while the catalog is unavailable (a restart, a blip)."""
        delay = 1.0
        for attempt in range(1, attempts + 1):
            try:
                return await self._register(job, output_dir, metrics)
            except Unavailable as error:
                if attempt == attempts:
                    raise
                log.warning("job %s: %s; retrying in %.0f s", job.name, error.message, delay)
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def _register(self, job: pb.TrainingJob, output_dir: Path, metrics: dict[str, Any]) -> str:
        """Import the output into the catalog as a child of the base model; returns its name."""
        if self.catalog is None:
            raise FailedPrecondition("no catalog configured", reason="NO_CATALOG")
        method = method_name(job.method).lower()
        labels = dict(job.labels)
        labels.update({"training-method": method, "training-job": job.name.removeprefix("trainingJobs/")})
        for key in ("train_loss", "eval_loss", "eval_perplexity"):
            if isinstance(metrics.get(key), int | float):
                labels[key.replace("_", "-")] = f"{float(metrics[key]):.6g}"
        for name, value in eval_metrics_of(metrics).items():
            labels[f"eval-{name.lower().replace('_', '-')}"] = f"{value:.6g}"
        if job.eval_row_count:
            labels["eval-rows"] = str(job.eval_row_count)
        if job.task:
            labels["training-task"] = task_name(job.task).lower()
        summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, int | float))
        try:
            model = await self.catalog.import_model(
                str(output_dir),
                model_id=job.output_model_id,
                parent=job.base_model,
                training_job=job.name,
                display_name=f"{job.base_model.removeprefix('models/')} ({method} fine-tune)",
                description=f"{method_name(job.method)} fine-tune of {job.base_model} by {job.name}. "
                f"{summary}",
                tags=["fine-tune", method, *(["reward-model"] if method == "reward" else [])],
                labels=labels,
            )
        except ModelyardRpcError as error:
            if error.code == grpc.StatusCode.ALREADY_EXISTS:
                # Registered before a crash: the same job's entry counts as done.
                with contextlib.suppress(ModelyardRpcError):
                    existing = await self.catalog.get_model(job.output_model_id)
                    if existing.source.fine_tune.training_job == job.name:
                        return existing.name
            raise catalog_error(error, str(output_dir)) from None
        return model.name

    async def _finish(
        self, job_id: str, state: int, *, reason: str = "", message: str = "", output_model: str = ""
    ) -> None:
        finished = await asyncio.to_thread(
            self.store.finish, job_id, self.config.worker_id, state,
            reason=reason, message=message, output_model=output_model,
        )  # fmt: skip
        if finished is not None:
            self.events.publish(STATE_CHANGED, finished)
            if state != jobs.SUCCEEDED:
                log.info("job %s: %s %s", job_id, state_name(state), reason)

    # ------------------------------------------------------------------ recovery

    async def recover(self) -> list[str]:
        """Resume or fail the jobs this trainer left RUNNING (it was killed); returns their ids."""
        left = await asyncio.to_thread(self.store.running_jobs, worker_id=self.config.worker_id)
        for job_id in left:
            if job_id not in self._running:
                await self._recover(
                    job_id, "TRAINER_RESTARTED", "the trainer restarted while the job was running"
                )
        return left

    async def _recover_lapsed(self) -> None:
        """Take over jobs whose trainer stopped renewing its lease, and resume or fail them."""
        now = self.store.clock()
        lapsed = await asyncio.to_thread(self.store.running_jobs, expired_before=now)
        for job_id in lapsed:
            if job_id in self._running:
                continue
            won = await asyncio.to_thread(
                self.store.take_over, job_id, self.config.worker_id,
                expired_before=now, lease_seconds=self.config.lease_seconds,
            )  # fmt: skip
            if won:
                await self._recover(
                    job_id, "TRAINER_LOST", "the trainer running the job stopped renewing its claim"
                )

    async def _recover(self, job_id: str, reason: str, message: str) -> None:
        """Re-queue a job owned by this trainer to resume from its last complete checkpoint, or fail it."""
        paths = JobPaths.of(self.config.data_dir, job_id)
        checkpoint = await asyncio.to_thread(find_complete_checkpoint, paths.checkpoints)
        job = await asyncio.to_thread(self.store.get, job_id)
        if checkpoint is None:
            await self._finish(
                job_id, jobs.FAILED, reason=reason, message=f"{message}; no checkpoint to resume from"
            )
            return
        if job.resume_count >= self.config.max_resumes:
            await self._finish(
                job_id, jobs.FAILED, reason="TOO_MANY_RESTARTS",
                message=f"{message}; resumed {job.resume_count} times already",
            )  # fmt: skip
            return
        await asyncio.to_thread(
            self.store.record_progress, job_id, self.config.worker_id, None, checkpoint_path=str(checkpoint)
        )
        requeued = await asyncio.to_thread(self.store.requeue, job_id, self.config.worker_id, resumed=True)
        if requeued is not None:
            log.warning("job %s: %s; queued to resume from %s", job_id, reason, checkpoint.name)
            self.events.publish(STATE_CHANGED, requeued)
            self._wakeup.set()
