"""How models, workers, reports and jobs look to a person at a terminal."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from google.protobuf.message import Message

from clients.output import (
    duration_text,
    enum_label,
    human_bytes,
    human_count,
    key_values,
    message_fields,
    number_text,
    printable,
    progress_bar,
    table,
    timestamp_text,
)
from modelyard.catalog.v1 import catalog_service_pb2, model_pb2, worker_pb2
from modelyard.trainer.v1 import trainer_service_pb2 as trainer_pb

# ---- models ---------------------------------------------------------------------------------------


def state_label(model: model_pb2.Model) -> str:
    """READY, IMPORTING, ..."""
    return enum_label(model_pb2.ModelState.DESCRIPTOR, model.state)


def kind_label(model: model_pb2.Model) -> str:
    """`LLM`, `LLM adapter`, `IMAGE lora`, ..."""
    kind = enum_label(model_pb2.ModelKind.DESCRIPTOR, model.kind)
    config = model.WhichOneof("config")
    if config == "llm" and model.llm.HasField("adapter"):
        return f"{kind} adapter"
    if config == "image" and model.image.checkpoint_type not in (
        model_pb2.CHECKPOINT_TYPE_UNSPECIFIED,
        model_pb2.CHECKPOINT_TYPE_CHECKPOINT,
    ):
        return (
            f"{kind} {enum_label(model_pb2.CheckpointType.DESCRIPTOR, model.image.checkpoint_type).lower()}"
        )
    return kind


def type_label(model: model_pb2.Model) -> str:
    """The model type (`llama`) or the image base model (`SDXL`)."""
    config = model.WhichOneof("config")
    if config == "llm":
        return model.llm.model_type
    if config == "image":
        return enum_label(model_pb2.ImageBaseModel.DESCRIPTOR, model.image.base_model)
    if config == "audio":
        return model.audio.model_type
    return ""


def architecture_label(model: model_pb2.Model) -> str:
    """Architecture class or pipeline class."""
    config = model.WhichOneof("config")
    if config == "llm":
        return model.llm.architecture
    if config == "image":
        return model.image.pipeline_class
    if config == "audio":
        return model.audio.architecture
    if config == "video":
        return model.video.architecture or model.video.pipeline_class
    return ""


def parameter_count(model: model_pb2.Model) -> int | None:
    """The parameter count when detected."""
    config = model.WhichOneof("config")
    if config is None:
        return None
    message = getattr(model, config)
    return message.parameter_count if message.HasField("parameter_count") else None


def model_rows(models: Iterable[model_pb2.Model]) -> list[list[object]]:
    """Rows of the models table."""
    return [
        [
            model.name.removeprefix("models/"),
            kind_label(model),
            type_label(model),
            architecture_label(model),
            human_count(parameter_count(model)),
            human_bytes(model.size_bytes),
            state_label(model),
            model.parent.removeprefix("models/"),
        ]
        for model in models
    ]


MODEL_HEADERS = ["NAME", "KIND", "TYPE", "ARCHITECTURE", "PARAMS", "SIZE", "STATE", "PARENT"]


def source_text(model: model_pb2.Model) -> str:
    """Where the files came from, in one line."""
    which = model.source.WhichOneof("source")
    if which == "hugging_face":
        hub = model.source.hugging_face
        text = f"hub {hub.repo_id}"
        if hub.revision:
            text += f"@{hub.revision}"
        return text + (f" (commit {hub.commit[:12]})" if hub.commit else "")
    if which == "local":
        return f"local {model.source.local.path}"
    if which == "fine_tune":
        tune = model.source.fine_tune
        return f"fine-tune of {tune.base_model} by {tune.training_job}"
    return ""


def model_block(model: model_pb2.Model, *, files: bool = True) -> str:
    """Everything about a model: identity, state, source, typed config, files."""
    parts = [
        key_values(
            [
                ("name", model.name),
                ("display name", model.display_name),
                ("kind", kind_label(model)),
                ("state", state_label(model)),
                ("error", f"{model.error.message} [{model.error.reason}]" if model.HasField("error") else ""),
                ("source", source_text(model)),
                ("local path", model.local_path),
                ("size", f"{human_bytes(model.size_bytes)} in {len(model.files)} file(s)"),
                ("parent", model.parent),
                ("version", model.version or ""),
                ("author", model.author),
                ("license", model.license),
                ("description", model.description),
                ("tags", ", ".join(model.tags)),
                ("labels", ", ".join(f"{k}={v}" for k, v in sorted(model.labels.items()))),
                ("created", _when(model, "create_time")),
                ("updated", _when(model, "update_time")),
            ]
        )
    ]
    config = model.WhichOneof("config")
    if config is not None:
        parts.append(f"\n{config} config:")
        parts.append(key_values(message_fields(getattr(model, config)), indent=2) or "  (nothing detected)")
    if files and model.files:
        parts.append("\nfiles:")
        rows = [[f.path, human_bytes(f.size_bytes), f.sha256[:16]] for f in model.files]
        parts.append(_indent(table(["PATH", "SIZE", "SHA256"], rows), 2))
    return "\n".join(parts)


def validation_text(response: catalog_service_pb2.ValidateModelResponse, model: str) -> str:
    """The checks of a validation as a table, and the verdict."""
    rows = [
        [check.check, enum_label(worker_pb2.RuleOutcome.DESCRIPTOR, check.outcome), check.message]
        for check in response.checks
    ]
    lines = [table(["CHECK", "OUTCOME", "MESSAGE"], rows)] if rows else []
    if response.missing_fields:
        lines.append(f"\nnot determined from the files: {', '.join(response.missing_fields)}")
    lines.append(f"\n{model}: {'valid' if response.valid else 'INVALID'}")
    return "\n".join(lines)


def lineage_text(response: catalog_service_pb2.GetModelLineageResponse) -> str:
    """Ancestors (root first), the model, then its descendants, as an indented tree."""
    lines = []
    chain = list(reversed(response.ancestors))
    for depth, ancestor in enumerate(chain):
        lines.append(f"{'  ' * depth}{ancestor.name}  ({kind_label(ancestor)}, {state_label(ancestor)})")
    depth = len(chain)
    model = response.model
    lines.append(f"{'  ' * depth}{model.name}  ({kind_label(model)}, {state_label(model)})  <- this model")
    children: dict[str, list[model_pb2.Model]] = {}
    for descendant in response.descendants:
        children.setdefault(descendant.parent, []).append(descendant)

    def walk(name: str, level: int) -> None:
        for child in children.get(name, []):
            lines.append(f"{'  ' * level}{child.name}  ({kind_label(child)}, {state_label(child)})")
            walk(child.name, level + 1)

    walk(model.name, depth + 1)
    if not response.ancestors and not response.descendants:
        lines.append("(no ancestors, no descendants)")
    return "\n".join(printable(line) for line in lines)


def detect_text(response: catalog_service_pb2.DetectModelTypeResponse) -> str:
    """The detected type and the compatible ones."""
    return key_values(
        [
            ("kind", enum_label(model_pb2.ModelKind.DESCRIPTOR, response.kind)),
            ("model type", response.model_type),
            ("architecture", response.architecture),
            ("compatible types", ", ".join(response.compatible_model_types)),
            ("recommended", response.recommended_model_type),
        ]
    )


# ---- workers and routing --------------------------------------------------------------------------


def worker_rows(workers: Iterable[worker_pb2.Worker]) -> list[list[object]]:
    """Rows of the workers table."""
    rows: list[list[object]] = []
    for worker in workers:
        device = worker.device
        memory = (
            f"{human_bytes(device.free_memory_bytes)} / {human_bytes(device.memory_bytes)}"
            if device.memory_bytes
            else ""
        )
        engine = ", ".join(
            " ".join(x for x in (caps.engine, caps.engine_version) if x)
            for caps in (worker.engines or [worker.capabilities])
        )
        rows.append(
            [
                worker.name.removeprefix("workers/"),
                enum_label(worker_pb2.WorkerRole.DESCRIPTOR, worker.role).lower(),
                engine,
                enum_label(worker_pb2.WorkerState.DESCRIPTOR, worker.state),
                worker.address,
                enum_label(worker_pb2.DeviceType.DESCRIPTOR, device.type),
                memory,
                ", ".join(m.model.removeprefix("models/") for m in worker.loaded_models),
                f"{worker.load.running}/{worker.load.queued}",
                timestamp_text(worker.last_heartbeat_time),
            ]
        )
    return rows


WORKER_HEADERS = [
    "NAME", "ROLE", "ENGINE", "STATE", "ADDRESS", "DEVICE", "FREE/TOTAL MEMORY", "LOADED",
    "RUN/QUEUED", "LAST HEARTBEAT",
]  # fmt: skip


def worker_block(worker: worker_pb2.Worker) -> str:
    """Everything about a worker."""
    return key_values(message_fields(worker))


def report_lines(match: catalog_service_pb2.WorkerMatch, heading: str) -> list[str]:
    """A worker's compatibility report: a heading line, then one line per rule."""
    report = match.report
    worker = match.worker
    verdict = enum_label(worker_pb2.Verdict.DESCRIPTOR, report.verdict)
    engine = report.engine or worker.capabilities.engine
    facts = [x for x in (worker.address, engine, verdict) if x]
    if worker.state not in (worker_pb2.WORKER_STATE_UNSPECIFIED, worker_pb2.WORKER_STATE_HEALTHY):
        facts.append(f"worker {enum_label(worker_pb2.WorkerState.DESCRIPTOR, worker.state)}")
    if report.HasField("estimated_memory_bytes"):
        facts.append(f"needs ~{human_bytes(report.estimated_memory_bytes)}")
    lines = [f"{heading}{worker.name or report.worker}  ({', '.join(facts)})"]
    if report.results:
        width = max(len(result.rule) for result in report.results)
        for result in report.results:
            outcome = enum_label(worker_pb2.RuleOutcome.DESCRIPTOR, result.outcome)
            lines.append(f"     {outcome:<4}  {result.rule:<{width}}  {result.message}".rstrip())
    for other in report.other_engines:
        verdict = enum_label(worker_pb2.Verdict.DESCRIPTOR, other.verdict)
        failures = [r for r in other.results if r.outcome == worker_pb2.RULE_OUTCOME_FAIL]
        why = f": {failures[0].rule}: {failures[0].message}" if failures else ""
        lines.append(f"     also on this worker: {other.engine} ({verdict}){why}")
    return [printable(line) for line in lines]  # stored strings: control characters escaped


def route_text(response: catalog_service_pb2.FindWorkersResponse, model: str, role: str) -> str:
    """Ranked matches and rejected workers, each with its rule results."""
    lines = []
    if response.matches:
        lines.append(printable(f"workers that can run {model} ({role}), best first:"))
        for rank, match in enumerate(response.matches, start=1):
            lines.extend(report_lines(match, f"  {rank}. "))
    else:
        lines.append(printable(f"no worker can run {model} ({role})"))
    if response.rejected:
        lines.append("")
        lines.append("rejected:")
        for match in response.rejected:
            lines.extend(report_lines(match, "  - "))
    return "\n".join(lines)


# ---- training jobs --------------------------------------------------------------------------------


def job_state(job: trainer_pb.TrainingJob) -> str:
    """QUEUED, RUNNING, SUCCEEDED, ..."""
    return enum_label(trainer_pb.TrainingJobState.DESCRIPTOR, job.state)


def method_label(job: trainer_pb.TrainingJob) -> str:
    """lora, full, ..."""
    return enum_label(trainer_pb.TrainingMethod.DESCRIPTOR, job.method).lower()


def eta_seconds(progress: trainer_pb.TrainingProgress) -> float | None:
    """The ETA in seconds when the trainer reported one."""
    if not progress.HasField("eta"):
        return None
    return progress.eta.ToTimedelta().total_seconds()


def progress_text(job: trainer_pb.TrainingJob, *, bar: bool = True) -> str:
    """`RUNNING [#####-----] 50/100 loss 1.23 eval 1.5 lr 0.0002 ETA 1m05s`."""
    progress = job.progress
    parts = [job_state(job)]
    if progress.total_steps or progress.step:
        if bar:
            parts.append(progress_bar(progress.step, progress.total_steps))
        parts.append(f"step {progress.step}/{progress.total_steps or '?'}")
    if progress.HasField("loss"):
        parts.append(f"loss {number_text(progress.loss)}")
    if progress.HasField("eval_loss"):
        parts.append(f"eval {number_text(progress.eval_loss)}")
    if progress.HasField("learning_rate"):
        parts.append(f"lr {number_text(progress.learning_rate, 3)}")
    eta = eta_seconds(progress)
    if eta is not None and job.state == trainer_pb.TRAINING_JOB_STATE_RUNNING:
        parts.append(f"ETA {duration_text(eta)}")
    return " ".join(parts)


def event_line(event: trainer_pb.WatchTrainingJobResponse) -> str:
    """One line for a watched event (control characters of stored strings escaped)."""
    return printable(_event_text(event))


def _event_text(event: trainer_pb.WatchTrainingJobResponse) -> str:
    job = event.job
    kind = event.event_type
    if kind == trainer_pb.TRAINING_EVENT_TYPE_STATE_CHANGED:
        text = f"state {job_state(job)}"
        if job.HasField("error"):
            text += f": {job.error.message} [{job.error.reason}]"
        if job.output_model:
            text += f" -> {job.output_model}"
        return text
    if kind == trainer_pb.TRAINING_EVENT_TYPE_EVAL:
        progress = job.progress
        eval_loss = progress.eval_loss if progress.HasField("eval_loss") else None
        text = f"eval  step {progress.step}: eval loss {number_text(eval_loss)}"
        if progress.HasField("eval_perplexity"):
            text += f", perplexity {number_text(progress.eval_perplexity)}"
        return text
    if kind == trainer_pb.TRAINING_EVENT_TYPE_CHECKPOINT:
        return f"checkpoint at step {job.progress.step}: {job.checkpoint_path}"
    return progress_text(job, bar=False)


JOB_HEADERS = ["NAME", "BASE MODEL", "METHOD", "STATE", "PROGRESS", "LOSS", "CREATED", "OUTPUT"]


def job_rows(jobs: Iterable[trainer_pb.TrainingJob]) -> list[list[object]]:
    """Rows of the jobs table."""
    rows: list[list[object]] = []
    for job in jobs:
        progress = job.progress
        rows.append(
            [
                job.name.removeprefix("trainingJobs/"),
                job.base_model.removeprefix("models/"),
                method_label(job),
                job_state(job),
                f"{progress.step}/{progress.total_steps}" if progress.total_steps else "",
                number_text(progress.loss) if progress.HasField("loss") else "",
                timestamp_text(job.create_time),
                job.output_model.removeprefix("models/"),
            ]
        )
    return rows


def job_block(job: trainer_pb.TrainingJob) -> str:
    """Everything about a job."""
    parts = [
        key_values(
            [
                ("name", job.name),
                ("state", job_state(job)),
                ("error", f"{job.error.message} [{job.error.reason}]" if job.HasField("error") else ""),
                ("base model", job.base_model),
                ("method", method_label(job)),
                ("dataset", job.dataset.source),
                (
                    "dataset format",
                    enum_label(trainer_pb.DatasetFormat.DESCRIPTOR, job.dataset.format).lower()
                    if job.dataset.format
                    else "",
                ),
                (
                    "rows",
                    f"{job.train_row_count} train, {job.eval_row_count} eval" if job.train_row_count else "",
                ),
                (
                    "task",
                    enum_label(trainer_pb.TrainingTask.DESCRIPTOR, job.task).lower() if job.task else "",
                ),
                (
                    "output model",
                    job.output_model or (f"{job.output_model_id} (pending)" if job.output_model_id else ""),
                ),
                ("progress", progress_text(job) if job.HasField("progress") else ""),
                (
                    "eval metrics",
                    ", ".join(f"{k} {number_text(v)}" for k, v in sorted(job.progress.eval_metrics.items())),
                ),
                ("created", _when(job, "create_time")),
                ("started", _when(job, "start_time")),
                ("ended", _when(job, "end_time")),
                ("checkpoint", job.checkpoint_path),
                ("resumed", job.resume_count or ""),
                ("labels", ", ".join(f"{k}={v}" for k, v in sorted(job.labels.items()))),
            ]
        )
    ]
    if job.HasField("hyperparameters"):
        parts.append("\nhyperparameters:")
        parts.append(key_values(message_fields(job.hyperparameters), indent=2) or "  (defaults)")
    if job.HasField("progress"):
        parts.append("\nprogress:")
        parts.append(key_values(message_fields(job.progress), indent=2))
    return "\n".join(parts)


def _when(message: Message, field: str) -> str:
    """A timestamp field as text, or empty (left out of key/value blocks) when unset."""
    return timestamp_text(getattr(message, field)) if message.HasField(field) else ""


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line else line for line in text.splitlines())


def joined(names: Sequence[str]) -> str:
    """Comma-joined, or `-`."""
    return ", ".join(names) or "-"
