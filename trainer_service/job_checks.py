"""Checks of a job request that depend on its method: the task it is evaluated for, the models it names.

Plain functions over protos and domain values (no catalog calls, no gRPC): the
manager calls them while creating a job, before any compute is spent.
"""

from __future__ import annotations

from typing import Any

import grpc

from clients.errors import ModelyardRpcError
from modelyard.catalog.v1 import model_pb2
from modelyard.trainer.v1 import trainer_service_pb2 as pb
from server_kit.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    ModelyardError,
    NotFound,
    Unavailable,
)
from trainer_service import datasets as ds

TASK_PREFIX = "TRAINING_TASK_"
TASK_METHODS = (ds.Method.LORA, ds.Method.QLORA, ds.Method.FULL)
"""Methods whose evaluation can generate answers and score them for a task."""
TASK_FORMATS = (
    ds.DatasetFormat.PROMPT_COMPLETION,
    ds.DatasetFormat.CHAT,
    ds.DatasetFormat.ALPACA,
    ds.DatasetFormat.SHAREGPT,
)
"""Formats whose rows have a prompt and a reference answer."""


def task_name(task: int) -> str:
    """`TRAINING_TASK_SUMMARIZATION` -> `SUMMARIZATION`; unspecified -> ``."""
    if task == pb.TRAINING_TASK_UNSPECIFIED or task not in pb.TrainingTask.values():
        return ""
    return pb.TrainingTask.Name(task).removeprefix(TASK_PREFIX)  # type: ignore[arg-type]


def check_task(task: int, method: ds.Method, fmt: ds.DatasetFormat) -> None:
    """InvalidArgument unless the job's task can be evaluated for its method and rows."""
    if task not in pb.TrainingTask.values():
        raise InvalidArgument(
            f"unknown task {task}",
            reason="INVALID_TASK",
            violations=[FieldViolation("job.task", "use SUMMARIZATION or QUESTION_ANSWERING")],
        )
    if task == pb.TRAINING_TASK_UNSPECIFIED:
        return
    name = task_name(task)
    if method not in TASK_METHODS:
        raise InvalidArgument(
            f"task {name} is evaluated by generating answers, which supervised methods "
            f"(LORA, QLORA, FULL) do; {method.value} reports its own metrics",
            reason="TASK_METHOD_MISMATCH",
            metadata={"task": name, "method": method.value},
            violations=[FieldViolation("job.task", f"not for method {method.value}")],
        )
    if fmt not in TASK_FORMATS:
        raise InvalidArgument(
            f"task {name} compares generated answers with references: the rows need a prompt and an "
            f"answer (prompt/completion, chat, Alpaca or ShareGPT), not {fmt.value.lower()}",
            reason="TASK_FORMAT_MISMATCH",
            metadata={"task": name, "format": fmt.value},
            violations=[FieldViolation("job.task", f"{fmt.value} rows have no reference answers")],
        )


def check_llm_task(model: model_pb2.Model, *, reward: bool, field_name: str) -> None:
    """FailedPrecondition unless `model` generates text (a base) or, with `reward`, is a reward model."""
    task = model.llm.task
    if reward and task != model_pb2.LLM_TASK_REWARD_MODEL:
        raise FailedPrecondition(
            f"{model.name} is not a reward model (a one-label sequence classifier, as REWARD jobs make)",
            reason="NOT_A_REWARD_MODEL",
            metadata={"model": model.name, "task": model_pb2.LlmTask.Name(task)},
        )
    if not reward and task in (model_pb2.LLM_TASK_REWARD_MODEL, model_pb2.LLM_TASK_SEQUENCE_CLASSIFICATION):
        raise FailedPrecondition(
            f"{model.name} scores sequences ({model_pb2.LlmTask.Name(task)}) and does not generate text; "
            f"fine-tune a text-generation model ({field_name})",
            reason="BASE_MODEL_NOT_GENERATIVE",
            metadata={"model": model.name},
        )


def reward_model_path(spec: dict[str, Any]) -> str:
    """The reward model folder a job's stored spec names (empty when none)."""
    return str(spec.get("reward_model_path") or "")


def catalog_error(error: ModelyardRpcError, what: str) -> ModelyardError:
    """A catalog failure as this service's error."""
    if error.code == grpc.StatusCode.NOT_FOUND:
        return NotFound(
            f"{what} is not in the catalog", reason="BASE_MODEL_NOT_FOUND", metadata={"model": what}
        )
    if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(
            f"the catalog did not answer about {what} ({error.code.name}); retry later",
            reason="CATALOG_UNAVAILABLE",
        )
    return FailedPrecondition(
        f"the catalog refused the request about {what}: {error.message}",
        reason=error.reason or "CATALOG_ERROR",
        metadata={"catalog_code": error.code.name, **error.metadata},
    )
