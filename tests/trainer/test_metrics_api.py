"""The metric history over gRPC: ListTrainingMetrics pages, grpcurl reads it, `jobs plot` draws it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from clients.cli import main as cli_main
from clients.trainer import AsyncTrainerClient
from modelyard.trainer.v1 import trainer_service_pb2 as pb
from server_kit.server import GrpcServer
from tests.helpers import grpcurl
from tests.trainer.conftest import BASE_MODEL
from trainer_service.app import TrainerApp
from trainer_service.settings import TrainerSettings

pytestmark = pytest.mark.slow
SERVICE = "modelyard.trainer.v1.TrainerService"


@pytest.fixture
async def trainer(tmp_path: Path, root: Path, catalog: str) -> AsyncIterator[GrpcServer]:
    settings = TrainerSettings(
        data_dir=tmp_path / "trainer", catalog_address=catalog, worker_id="trainer-metrics",
        dataset_roots=[root, tmp_path], poll_seconds=0.2, grace_seconds=5.0,
    )  # fmt: skip
    server = GrpcServer(TrainerApp(settings), "127.0.0.1:0", grace_seconds=1.0)
    await server.start()
    yield server
    await server.stop(0)


async def test_metric_history_pages_over_grpc_and_plots_in_the_terminal(
    trainer: GrpcServer, data: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    async with AsyncTrainerClient(trainer.target) as client:
        job = await client.create_training_job(
            BASE_MODEL, str(data["prompt_completion"]), method="lora", max_steps=3, batch_size=2,
            learning_rate=1e-2, eval_steps=2,
        )  # fmt: skip
        assert job.eval_row_count == 1 and job.train_row_count == 7  # the default split, reported
        async with asyncio.timeout(300):
            final = [e async for e in client.watch_training_job(job.name)][-1].job
        assert final.state == pb.TRAINING_JOB_STATE_SUCCEEDED, final.error
        first = await client.list_training_metrics_page(job.name, page_size=2)
        assert len(first.points) == 2 and first.next_page_token
        points = [p async for p in client.list_training_metrics(job.name, page_size=2)]
    train = [p.step for p in points if p.kind == pb.METRIC_KIND_TRAIN]
    evals = [p.step for p in points if p.kind == pb.METRIC_KIND_EVAL]
    assert train == [1, 2, 3] and evals == [2, 3]  # every eval_steps, and at the end

    answer = await asyncio.to_thread(
        grpcurl, trainer.target, f"{SERVICE}/ListTrainingMetrics", data=json.dumps({"parent": job.name})
    )
    assert answer.returncode == 0, answer.stderr
    listed = json.loads(answer.stdout)["points"]
    assert listed[0]["kind"] == "METRIC_KIND_TRAIN" and "loss" in listed[0]["values"]

    code = await asyncio.to_thread(cli_main, ["jobs", "plot", job.name, "--trainer", trainer.target])
    drawn = capsys.readouterr().out
    assert code == 0, drawn
    assert "* training loss (3 points" in drawn and "o eval loss (2 points" in drawn
    assert sum(line.count("*") for line in drawn.splitlines()[1:-3]) == 3
