"""TrainerClient and AsyncTrainerClient against a fake trainer on a real gRPC server."""

from __future__ import annotations

import grpc
import pytest

from clients.errors import ModelyardRpcError
from clients.trainer import AsyncTrainerClient, TrainerClient
from modelyard.trainer.v1 import trainer_service_pb2 as tpb
from tests.clients.conftest import Served


def test_create_sends_method_dataset_and_hyperparameters(trainer: Served) -> None:
    with TrainerClient(trainer.address) as client:
        job = client.create_training_job(
            "tiny",
            "/data/chat.jsonl",
            method="dpo",
            dataset_format="preference",
            output_model_id="tiny-dpo",
            labels={"team": "nlp"},
            epochs=2,
            learning_rate=5e-6,
            lora_r=4,
            batch_size=None,
        )
    assert job.name == "trainingJobs/job-1"
    assert job.state == tpb.TRAINING_JOB_STATE_QUEUED
    sent = trainer.servicer.requests[-1]
    assert isinstance(sent, tpb.CreateTrainingJobRequest)
    assert sent.job.base_model == "models/tiny"
    assert sent.job.method == tpb.TRAINING_METHOD_DPO
    assert sent.job.dataset == tpb.Dataset(source="/data/chat.jsonl", format=tpb.DATASET_FORMAT_PREFERENCE)
    assert sent.job.hyperparameters.epochs == 2
    assert sent.job.hyperparameters.lora.r == 4
    assert not sent.job.hyperparameters.HasField("batch_size")
    assert (sent.job.output_model_id, dict(sent.job.labels)) == ("tiny-dpo", {"team": "nlp"})


def test_bad_request_carries_field_violations(trainer: Served) -> None:
    with TrainerClient(trainer.address) as client, pytest.raises(ModelyardRpcError) as error:
        client.create_training_job("tiny", "")
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.field_violations == [("job.dataset.source", "required")]


def test_list_iterates_over_every_page(trainer: Served) -> None:
    with TrainerClient(trainer.address) as client:
        created = {client.create_training_job("tiny", f"/d{i}.jsonl").name for i in range(5)}
        listed = [job.name for job in client.list_training_jobs(page_size=2)]
    assert sorted(listed) == sorted(created)
    pages = [r for r in trainer.servicer.requests if isinstance(r, tpb.ListTrainingJobsRequest)]
    assert [p.page_token for p in pages] == ["", "2", "4"]


def test_watch_streams_progress_until_the_job_ends(trainer: Served) -> None:
    with TrainerClient(trainer.address) as client:
        job = client.create_training_job("tiny", "/d.jsonl")
        events = list(client.watch_training_job(job.name))
        final = client.wait_training_job(job.name)
    kinds = [e.event_type for e in events]
    assert kinds[0] == tpb.TRAINING_EVENT_TYPE_STATE_CHANGED
    assert kinds.count(tpb.TRAINING_EVENT_TYPE_PROGRESS) == 6
    assert kinds.count(tpb.TRAINING_EVENT_TYPE_EVAL) == 2
    losses = [e.job.progress.loss for e in events if e.event_type == tpb.TRAINING_EVENT_TYPE_PROGRESS]
    assert losses == sorted(losses, reverse=True)
    assert events[-1].job.state == tpb.TRAINING_JOB_STATE_SUCCEEDED
    assert final.output_model == "models/tiny-ft-1"


def test_cancel_and_validate(trainer: Served) -> None:
    with TrainerClient(trainer.address) as client:
        job = client.create_training_job("tiny", "/d.jsonl")
        assert client.cancel_training_job(job.name.removeprefix("trainingJobs/")).state == (
            tpb.TRAINING_JOB_STATE_CANCELLED
        )
        report = client.validate_dataset("/d.jsonl", method="lora", base_model="tiny", max_seq_length=128)
        with pytest.raises(ModelyardRpcError) as missing:
            client.get_training_job("nope")
    assert report.valid and report.num_rows == 12
    sent = trainer.servicer.requests[-1]
    assert isinstance(sent, tpb.ValidateDatasetRequest)
    assert (sent.base_model, sent.max_seq_length) == ("models/tiny", 128)
    assert (missing.value.code, missing.value.reason) == (grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")


async def test_async_trainer_client(trainer: Served) -> None:
    async with AsyncTrainerClient(trainer.address) as client:
        job = await client.create_training_job("tiny", "/d.jsonl", method="full", max_steps=3)
        assert (await client.get_training_job(job.name)).hyperparameters.max_steps == 3
        assert [j.name async for j in client.list_training_jobs(page_size=1)] == [job.name]
        final = await client.wait_training_job(job.name)
        assert final.state == tpb.TRAINING_JOB_STATE_SUCCEEDED
        assert (await client.validate_dataset("/d.jsonl")).format == tpb.DATASET_FORMAT_CHAT
