"""The job manager end to end: real catalog, real worker processes, real (tiny) training.

Jobs run a few optimizer steps of a 100 K-parameter Llama on 8 rows, so each
takes seconds; the assertions are about what users rely on: states in order,
progress streamed, loss falling, checkpoints kept, results registered in the
catalog with their lineage, bad requests refused before any compute.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clients.catalog import AsyncCatalogClient
from modelyard.trainer.v1 import trainer_service_pb2 as pb
from server_kit.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tests.trainer.conftest import BASE_MODEL, chat_rows, write_jsonl
from trainer_service import jobs
from trainer_service.manager import CHECKPOINT, EVAL, PROGRESS, STATE_CHANGED, JobEvent, JobManager
from trainer_service.runner import JobPaths
from trainer_service.strategies.base import find_complete_checkpoint

pytestmark = pytest.mark.slow


def request(
    dataset: Path,
    method: pb.TrainingMethod.ValueType = pb.TRAINING_METHOD_LORA,
    *,
    output: str = "",
    **hyper: Any,
) -> pb.TrainingJob:
    params = {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-2, "save_steps": 2, **hyper}
    return pb.TrainingJob(
        base_model=BASE_MODEL,
        dataset=pb.Dataset(source=str(dataset)),
        method=method,
        hyperparameters=pb.Hyperparameters(**params),
        output_model_id=output,
    )


async def follow(manager: JobManager, name: str, timeout: float = 300.0) -> list[JobEvent]:
    """Every watch event of a job until it ends."""
    events: list[JobEvent] = []
    async with asyncio.timeout(timeout):
        async for event in manager.watch(name):
            events.append(event)
    return events


def states(events: list[JobEvent]) -> list[str]:
    return [jobs.state_name(e.job.state) for e in events if e.type == STATE_CHANGED]


async def test_lora_chat_job_trains_evaluates_and_registers_the_adapter(
    make_manager: Callable[..., JobManager], data: dict[str, Path], catalog_client: AsyncCatalogClient,
    tiny_llama: Path,
) -> None:  # fmt: skip
    manager = make_manager()
    await manager.start()
    job = await manager.create("", request(data["chat"], output="tiny-chat-lora", eval_split=0.25))
    assert job.state == jobs.QUEUED
    assert job.dataset.format == pb.DATASET_FORMAT_CHAT
    assert job.hyperparameters.lora.r == 8 and job.hyperparameters.max_seq_length == 256  # defaults filled in
    events = await follow(manager, job.name)

    assert states(events)[0] == "QUEUED" and "RUNNING" in states(events) and states(events)[-1] == "SUCCEEDED"
    final = events[-1].job
    assert final.output_model == "models/tiny-chat-lora"
    progress = [e.job.progress for e in events if e.type == PROGRESS and e.job.progress.HasField("loss")]
    steps = [p.step for p in progress]
    assert steps == sorted(steps) and steps[-1] == 4 and progress[-1].total_steps == 4
    losses = [p.loss for p in progress]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0], losses
    assert all(p.samples_per_second > 0 and p.tokens_per_second > 0 for p in progress)
    evals = [e.job.progress for e in events if e.type == EVAL]
    assert evals and math.isclose(evals[-1].eval_perplexity, math.exp(evals[-1].eval_loss), rel_tol=1e-6)
    assert [e.type for e in events].count(CHECKPOINT) == 2  # steps 2 and 4
    assert final.checkpoint_path.endswith("checkpoint-4")

    output = JobPaths.of(manager.config.data_dir, job.name.split("/")[1]).output
    assert (output / "adapter_model.safetensors").is_file() and (output / "tokenizer.json").is_file()
    model = await catalog_client.get_model("tiny-chat-lora")
    assert model.parent == BASE_MODEL
    assert model.source.fine_tune.training_job == job.name
    assert model.llm.HasField("adapter")
    assert model.labels["training-method"] == "lora" and "train-loss" in model.labels

    # The adapter changes what the model computes.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    ids = torch.tensor([[4, 90, 88, 265]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(output))(ids).logits
    assert not torch.allclose(before, tuned)


async def test_dpo_and_full_fine_tune_jobs_succeed(
    make_manager: Callable[..., JobManager], data: dict[str, Path], catalog_client: AsyncCatalogClient
) -> None:
    manager = make_manager()
    await manager.start()
    dpo = await manager.create("dpo-job", request(data["preference"], pb.TRAINING_METHOD_DPO, max_steps=3))
    assert dpo.hyperparameters.dpo_beta == pytest.approx(0.1)
    full = await manager.create("full-job", request(data["text"], pb.TRAINING_METHOD_FULL, max_steps=3))
    assert not full.hyperparameters.HasField("lora")
    dpo_events, full_events = await asyncio.gather(follow(manager, dpo.name), follow(manager, full.name))

    for events in (dpo_events, full_events):
        assert states(events)[-1] == "SUCCEEDED", events[-1].job.error
        losses = [
            e.job.progress.loss for e in events if e.type == PROGRESS and e.job.progress.HasField("loss")
        ]
        assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    dpo_model = await catalog_client.get_model(dpo_events[-1].job.output_model)
    assert dpo_model.llm.HasField("adapter") and dpo_model.parent == BASE_MODEL
    full_model = await catalog_client.get_model(full_events[-1].job.output_model)
    assert not full_model.llm.HasField("adapter") and full_model.parent == BASE_MODEL
    assert full_model.llm.architecture == "LlamaForCausalLM"
    assert full_model.name.startswith("models/tiny-llama-ft-")


async def test_qlora_is_refused_without_cuda(
    make_manager: Callable[..., JobManager], data: dict[str, Path]
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    manager = make_manager()
    with pytest.raises(FailedPrecondition) as error:
        await manager.create("", request(data["chat"], pb.TRAINING_METHOD_QLORA))
    assert error.value.reason == "QLORA_REQUIRES_CUDA"
    assert (await manager.list_jobs())[0] == []


async def test_bad_requests_are_refused_before_any_compute(
    make_manager: Callable[..., JobManager], data: dict[str, Path], root: Path, tmp_path: Path,
    catalog_client: AsyncCatalogClient,
) -> None:  # fmt: skip
    manager = make_manager()
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [*chat_rows(2), {"messages": [{"role": "user", "content": "x"}]}]
    )
    with pytest.raises(InvalidArgument) as error:
        await manager.create("", request(bad))
    assert error.value.reason == "INVALID_DATASET"
    assert [v.field for v in error.value.violations] == ["dataset.rows[2].messages"]

    with pytest.raises(NotFound) as missing:
        await manager.create(
            "", pb.TrainingJob(**{**_fields(request(data["chat"])), "base_model": "models/nope"})
        )
    assert missing.value.reason == "BASE_MODEL_NOT_FOUND"

    with pytest.raises(InvalidArgument) as hyper:
        await manager.create("", request(data["chat"], learning_rate=-1.0, batch_size=0))
    assert {v.field for v in hyper.value.violations} == {
        "job.hyperparameters.learning_rate",
        "job.hyperparameters.batch_size",
    }
    with pytest.raises(InvalidArgument) as too_long:
        await manager.create("", request(data["chat"], max_seq_length=100_000))
    assert too_long.value.reason == "SEQUENCE_TOO_LONG"

    with pytest.raises(AlreadyExists) as taken:
        await manager.create("", request(data["chat"], output="tiny-llama"))
    assert taken.value.reason == "OUTPUT_MODEL_EXISTS"

    # A GGUF model is in the catalog, but this trainer cannot train it: the compatibility check says why.
    from tinymodels.gguf_file import build_gguf

    gguf = build_gguf(root / "models" / "tiny.gguf")
    await catalog_client.import_model(str(gguf), model_id="tiny-gguf")
    with pytest.raises(FailedPrecondition) as incompatible:
        await manager.create(
            "", pb.TrainingJob(**{**_fields(request(data["chat"])), "base_model": "models/tiny-gguf"})
        )
    assert incompatible.value.reason == "INCOMPATIBLE_MODEL"
    assert "weight_format" in incompatible.value.metadata["rules"]

    checked = await manager.create("checked", request(data["chat"]), validate_only=True)
    assert checked.name == "trainingJobs/checked" and checked.state == pb.TRAINING_JOB_STATE_UNSPECIFIED
    assert (await manager.list_jobs())[0] == []


def _fields(job: pb.TrainingJob) -> dict[str, Any]:
    return {f.name: v for f, v in job.ListFields()}


async def test_shutdown_preempts_and_a_resumed_job_can_be_cancelled(
    make_manager: Callable[..., JobManager], data: dict[str, Path]
) -> None:
    """A trainer shutting down checkpoints its job and queues it; the next one resumes it; cancel stops it."""
    first = make_manager()
    await first.start()
    job = await first.create("long", request(data["chat"], max_steps=500, save_steps=1, learning_rate=1e-4))
    async with asyncio.timeout(300):
        async for event in first.watch(job.name):
            if event.type == CHECKPOINT:
                break
    await first.stop()
    preempted = await first.get(job.name)
    assert jobs.state_name(preempted.state) == "QUEUED" and preempted.resume_count == 0
    assert preempted.checkpoint_path and preempted.progress.step >= 1

    second = make_manager()
    await second.start()
    seen: list[JobEvent] = []
    cancelled_at = 0.0
    async with asyncio.timeout(300):
        async for event in second.watch(job.name):
            seen.append(event)
            if event.type == PROGRESS and event.job.progress.HasField("loss") and not cancelled_at:
                assert event.job.progress.step > preempted.progress.step  # resumed, not restarted
                cancelled_at = asyncio.get_running_loop().time()
                answer = await second.cancel(job.name)
                assert answer.state == jobs.RUNNING  # stops after its current step
    assert states(seen)[-1] == "CANCELLED"
    assert asyncio.get_running_loop().time() - cancelled_at < 30
    final = seen[-1].job
    assert final.progress.step < 500
    checkpoint = find_complete_checkpoint(JobPaths.of(second.config.data_dir, "long").checkpoints)
    assert checkpoint is not None and final.checkpoint_path == str(checkpoint)
    assert int(checkpoint.name.split("-")[1]) == final.progress.step  # the last step was saved
    with pytest.raises(FailedPrecondition):
        await second.cancel(job.name)


async def test_a_killed_worker_is_resumed_from_its_last_checkpoint(
    make_manager: Callable[..., JobManager], data: dict[str, Path]
) -> None:
    manager = make_manager()
    await manager.start()
    job = await manager.create(
        "crashy", request(data["chat"], max_steps=12, save_steps=2, learning_rate=1e-4)
    )
    seen: list[JobEvent] = []
    killed = False
    async with asyncio.timeout(300):
        async for event in manager.watch(job.name):
            seen.append(event)
            if event.type == CHECKPOINT and not killed:
                pid = manager.worker_pid("crashy")
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                killed = True
    final = seen[-1].job
    assert states(seen)[-1] == "SUCCEEDED", final.error
    assert final.resume_count == 1
    requeued = next(i for i, e in enumerate(seen) if e.type == STATE_CHANGED and e.job.resume_count == 1)
    assert jobs.state_name(seen[requeued].job.state) == "QUEUED"
    resumed_steps = [e.job.progress.step for e in seen[requeued + 1 :] if e.type == PROGRESS]
    assert resumed_steps[0] >= 2, resumed_steps  # continued from a checkpoint, not from step 0


async def test_a_restarted_trainer_leaves_no_job_running(
    make_manager: Callable[..., JobManager], data: dict[str, Path]
) -> None:
    """Jobs a dead trainer left RUNNING: resumed from a checkpoint, else FAILED with the reason."""
    first = make_manager()
    store = first.store
    for job_id in ("with-checkpoint", "without-checkpoint", "resumed-too-often"):
        await first.create(job_id, request(data["chat"]))
        assert store.claim_next("trainer-test", 30) is not None  # the old trainer took them, then died
    checkpoint = JobPaths.of(first.config.data_dir, "with-checkpoint").checkpoints / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    half_written = JobPaths.of(first.config.data_dir, "with-checkpoint").checkpoints / "checkpoint-4"
    half_written.mkdir()  # no trainer_state.json: incomplete, ignored
    often = JobPaths.of(first.config.data_dir, "resumed-too-often").checkpoints / "checkpoint-2"
    often.mkdir(parents=True)
    (often / "trainer_state.json").write_text("{}")
    for _ in range(3):
        store.requeue("resumed-too-often", "trainer-test", resumed=True)
        store.claim_next("trainer-test", 30)

    restarted = make_manager()
    recovered = await restarted.recover()
    assert sorted(recovered) == ["resumed-too-often", "with-checkpoint", "without-checkpoint"]
    resumed = store.get("with-checkpoint")
    assert resumed.state == jobs.QUEUED and resumed.resume_count == 1
    assert resumed.checkpoint_path == str(checkpoint)
    failed = store.get("without-checkpoint")
    assert failed.state == jobs.FAILED and failed.error.reason == "TRAINER_RESTARTED"
    assert store.get("resumed-too-often").error.reason == "TOO_MANY_RESTARTS"
    assert store.running_jobs() == []
