"""The trainer's gRPC surface: a real server on a free port, the typed client, grpcurl, a killed trainer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from clients.catalog import CatalogClient
from clients.errors import ModelyardRpcError
from clients.trainer import AsyncTrainerClient
from modelyard.catalog.v1 import worker_pb2
from modelyard.trainer.v1 import trainer_service_pb2 as pb
from server_kit.server import GrpcServer
from tests.helpers import ServerProcess, grpcurl
from tests.trainer.conftest import BASE_MODEL, write_jsonl
from trainer_service.app import TrainerApp
from trainer_service.settings import TrainerSettings

pytestmark = pytest.mark.slow
SERVICE = "modelyard.trainer.v1.TrainerService"


@pytest.fixture
async def trainer(tmp_path: Path, root: Path, catalog: str) -> AsyncIterator[GrpcServer]:
    """The trainer app served on a free port, registered with the test catalog."""
    settings = TrainerSettings(
        data_dir=tmp_path / "trainer",
        catalog_address=catalog,
        worker_id="trainer-grpc",
        dataset_roots=[root, tmp_path],
        poll_seconds=0.2,
        grace_seconds=5.0,
    )
    server = GrpcServer(TrainerApp(settings), "127.0.0.1:0", grace_seconds=1.0)
    await server.start()
    yield server
    await server.stop(0)


async def test_jobs_through_the_grpc_api(
    trainer: GrpcServer, catalog: str, data: dict[str, Path], tmp_path: Path
) -> None:
    listed = await asyncio.to_thread(grpcurl, trainer.target, "list")
    assert SERVICE in listed.stdout.split()

    # Bad rows come back by row number, through the real grpcurl binary.
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 7}]
    )
    body = json.dumps(
        {"dataset": {"source": str(bad)}, "method": "TRAINING_METHOD_LORA", "base_model": BASE_MODEL}
    )
    answer = await asyncio.to_thread(grpcurl, trainer.target, f"{SERVICE}/ValidateDataset", data=body)
    assert answer.returncode == 0, answer.stderr
    report = json.loads(answer.stdout)
    assert report.get("valid", False) is False and report["num_rows"] == "2"
    assert report["format"] == "DATASET_FORMAT_PROMPT_COMPLETION"
    assert report["issues"] == [
        {"row": "1", "field": "completion", "message": "must be a string, not a number"}
    ]

    async with AsyncTrainerClient(trainer.target) as client:
        job = await client.create_training_job(
            BASE_MODEL, str(data["prompt_completion"]), method="lora", max_steps=4, batch_size=2,
            learning_rate=1e-2, save_steps=2, labels={"team": "nlp"},
        )  # fmt: skip
        assert job.state == pb.TRAINING_JOB_STATE_QUEUED
        events: list[pb.WatchTrainingJobResponse] = []
        fetched_while_running: pb.TrainingJob | None = None
        async with asyncio.timeout(300):
            async for event in client.watch_training_job(job.name):
                events.append(event)
                if event.event_type == pb.TRAINING_EVENT_TYPE_PROGRESS and fetched_while_running is None:
                    # The server answers while a job trains (training runs in another process).
                    fetched_while_running = await client.get_training_job(job.name)
        assert fetched_while_running is not None
        assert fetched_while_running.state == pb.TRAINING_JOB_STATE_RUNNING
        assert events[0].event_type == pb.TRAINING_EVENT_TYPE_STATE_CHANGED
        final = events[-1].job
        assert final.state == pb.TRAINING_JOB_STATE_SUCCEEDED, final.error
        assert final.output_model and final.labels["team"] == "nlp"
        steps = [e.job.progress.step for e in events if e.event_type == pb.TRAINING_EVENT_TYPE_PROGRESS]
        assert steps == sorted(steps) and steps[-1] == 4

        # Joining after the end gives the final state and ends.
        late = [event async for event in client.watch_training_job(job.name)]
        assert [e.job.state for e in late] == [pb.TRAINING_JOB_STATE_SUCCEEDED]
        done = [
            j.name async for j in client.list_training_jobs(filter='state = "SUCCEEDED" AND method = LORA')
        ]
        assert done == [job.name]

        with pytest.raises(ModelyardRpcError) as finished:
            await client.cancel_training_job(job.name)
        assert finished.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert finished.value.reason == "JOB_ALREADY_FINISHED"
        with pytest.raises(ModelyardRpcError) as missing:
            await client.get_training_job("trainingJobs/nope")
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ModelyardRpcError) as missing_watch:
            _ = [event async for event in client.watch_training_job("trainingJobs/nope")]
        assert missing_watch.value.code == grpc.StatusCode.NOT_FOUND
        assert missing_watch.value.reason == "JOB_NOT_FOUND"
        with pytest.raises(ModelyardRpcError) as bad_rows:
            await client.create_training_job(BASE_MODEL, str(bad), method="lora")
        assert bad_rows.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_rows.value.field_violations == [
            ("dataset.rows[1].completion", "must be a string, not a number")
        ]
        import torch

        if not torch.cuda.is_available():
            with pytest.raises(ModelyardRpcError) as qlora:
                await client.create_training_job(BASE_MODEL, str(data["chat"]), method="qlora")
            assert qlora.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert qlora.value.reason == "QLORA_REQUIRES_CUDA"

    # The trainer registered itself with the catalog as a training worker.
    with CatalogClient(catalog) as catalog_client:
        worker = await asyncio.to_thread(catalog_client.get_worker, "trainer-grpc")
    assert worker.role == worker_pb2.WORKER_ROLE_TRAINING
    assert worker.capabilities.engine == "peft" and "lora" in worker.capabilities.training_methods


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(FileNotFoundError):
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    return False


async def test_a_trainer_killed_mid_job_resumes_it_after_restart(
    tmp_path: Path, root: Path, catalog: str, data: dict[str, Path]
) -> None:
    """SIGKILL the trainer mid-job: its worker dies with it; the restarted trainer finishes the job."""
    data_dir = tmp_path / "trainer"
    args = [
        "--data-dir", str(data_dir), "--catalog-address", catalog, "--worker-id", "trainer-killed",
        "--dataset-roots", f"{root}{os.pathsep}{tmp_path}", "--poll-seconds", "0.2",
        "--drain-seconds", "0", "--grace-seconds", "2",
    ]  # fmt: skip
    first = ServerProcess("trainer_service", args, log_path=tmp_path / "first.log")
    second: ServerProcess | None = None
    try:
        await asyncio.to_thread(first.wait_serving, 90)
        async with AsyncTrainerClient(first.address) as client:
            job = await client.create_training_job(
                BASE_MODEL, str(data["chat"]), method="lora", job_id="survivor", max_steps=12,
                batch_size=2, save_steps=2, learning_rate=1e-4,
            )  # fmt: skip
            async with asyncio.timeout(300):
                async for event in client.watch_training_job(job.name):
                    if event.event_type == pb.TRAINING_EVENT_TYPE_CHECKPOINT:
                        break
        worker_pid = int((data_dir / "jobs" / "survivor" / "worker.pid").read_text())
        first.terminate(signal.SIGKILL)
        await asyncio.to_thread(first.proc.wait, 30)
        async with asyncio.timeout(30):
            while _alive(worker_pid):  # the worker follows its trainer (parent-death signal)
                await asyncio.sleep(0.1)

        second = ServerProcess("trainer_service", args, log_path=tmp_path / "second.log")
        await asyncio.to_thread(second.wait_serving, 90)
        async with AsyncTrainerClient(second.address) as client:
            final = await asyncio.wait_for(client.wait_training_job(job.name), 300)
        assert final.state == pb.TRAINING_JOB_STATE_SUCCEEDED, (final.error, second.log())
        assert final.resume_count == 1
        assert final.output_model
    finally:
        await asyncio.to_thread(first.stop, 10)
        if second is not None:
            await asyncio.to_thread(second.stop, 30)
