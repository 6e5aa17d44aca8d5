"""Several trainers on one job database: every job is claimed, and run, by exactly one of them.

The store test races separate processes (each its own engine and connection
pool, as separate trainers have) for one queue, on SQLite and PostgreSQL. The
service test runs two real trainer processes and a catalog on one PostgreSQL
database, queues four tiny LoRA jobs through both trainers, and checks that
each ends SUCCEEDED once, run by one trainer (the job store keeps the id of
the trainer that ran a job; the job's working folder exists only under that
trainer's data folder), with one fine-tuned model registered per job.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clients.catalog import CatalogClient
from clients.trainer import TrainerClient
from modelyard.trainer.v1 import trainer_service_pb2 as pb
from tests.pg import postgres_database
from tests.scaleout.conftest import Fleet
from trainer_service import jobs
from trainer_service.db import migrate
from trainer_service.jobs import JobStore

JOBS = 24
CLAIMERS = 4


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def job_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated job database: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'trainer.db'}"
        migrate(url)
        yield url
        return
    with postgres_database("modelyard_scaleout") as url:
        migrate(url)
        yield url


def claim_all(url: str, worker: str, start: Any, results: Any) -> None:
    """A trainer process's loop: claim jobs until the queue is empty; report what it got."""
    store = JobStore(url)
    claimed: list[str] = []
    try:
        start.wait(60)
        while (job := store.claim_next(worker, 60)) is not None:
            claimed.append(job.job_id)
    finally:
        store.close()
        results.put((worker, claimed))


def test_processes_claiming_from_one_queue_never_get_the_same_job(job_db: str) -> None:
    store = JobStore(job_db)
    for i in range(JOBS):
        store.create(f"job-{i}", pb.TrainingJob(base_model="models/m", method=pb.TRAINING_METHOD_LORA))
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(CLAIMERS)
    results = context.Queue()
    processes = [
        context.Process(target=claim_all, args=(job_db, f"trainer-{k}", start, results))
        for k in range(CLAIMERS)
    ]
    for process in processes:
        process.start()
    reports = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(30)
        assert process.exitcode == 0

    claims = [(job_id, worker) for worker, claimed in reports.items() for job_id in claimed]
    assert sorted(job_id for job_id, _ in claims) == sorted(f"job-{i}" for i in range(JOBS))  # each once
    for job_id, worker in claims:
        assert store.owner(job_id)[0] == worker
        assert store.get(job_id).state == jobs.RUNNING
    assert store.claim_next("late", 60) is None
    store.close()


@pytest.mark.slow
@pytest.mark.postgres
def test_two_trainer_processes_run_each_job_exactly_once(
    pg_fleet: tuple[Fleet, str], workdir: Path, tiny_llama: Path, chat_data: Path
) -> None:
    fleet, url = pg_fleet
    catalog = fleet.start(
        "catalog_service",
        "catalog",
        {
            "MODELYARD_CATALOG_DATABASE_URL": url,
            "MODELYARD_CATALOG_ALLOWED_ROOTS": f"{workdir}:{fleet.folder}",
        },
    )
    catalog.wait_serving(60)
    trainer_env = {
        "MODELYARD_TRAINER_DATABASE_URL": url,  # the catalog's database: they may share it
        "MODELYARD_CATALOG_ADDRESS": catalog.address,
        "MODELYARD_TRAINER_MAX_CONCURRENT_JOBS": "2",
        "MODELYARD_TRAINER_POLL_SECONDS": "0.3",
        "MODELYARD_TRAINER_DATASET_ROOTS": str(workdir),
        "OMP_NUM_THREADS": "1",
    }
    trainers = {
        name: fleet.start("trainer_service", name, {**trainer_env, "MODELYARD_TRAINER_WORKER_ID": name})
        for name in ("trainer-a", "trainer-b")
    }
    with CatalogClient(catalog.address) as catalog_client:
        catalog_client.import_model(str(tiny_llama), model_id="tiny-llama")
        for trainer in trainers.values():
            trainer.wait_serving(120)
        with (
            TrainerClient(trainers["trainer-a"].address, timeout=60) as a,
            TrainerClient(trainers["trainer-b"].address, timeout=60) as b,
        ):
            created = [
                (a, b)[i % 2].create_training_job(
                    "tiny-llama",
                    str(chat_data),
                    job_id=f"job-{i}",
                    output_model_id=f"tiny-llama-ft-{i}",
                    max_steps=1,
                    batch_size=2,
                    save_steps=1000,
                )
                for i in range(4)
            ]
            # Trainer A follows every job, also those trainer B runs (it re-reads the shared store).
            finished = [a.wait_training_job(job.name, timeout=240) for job in created]
        assert [job.state for job in finished] == [pb.TRAINING_JOB_STATE_SUCCEEDED] * 4, fleet.logs()
        fine_tunes = list(catalog_client.list_models(filter="parent = models/tiny-llama"))

    store = JobStore(url)
    try:
        ran_by = {f"job-{i}": store.owner(f"job-{i}")[0] for i in range(4)}
    finally:
        store.close()
    assert set(ran_by.values()) == set(trainers), f"one trainer ran every job: {ran_by}"
    for job_id, trainer_name in ran_by.items():
        # The job ran where its working folder is, and only there.
        assert [name for name in trainers if (fleet.folder / name / "jobs" / job_id).is_dir()] == [
            trainer_name
        ]
    for i, job in enumerate(finished):
        assert job.resume_count == 0
        assert job.output_model == f"models/tiny-llama-ft-{i}"
    # One registered model per job: no job was trained and registered twice.
    assert sorted(m.name for m in fine_tunes) == [f"models/tiny-llama-ft-{i}" for i in range(4)]
    assert {m.source.fine_tune.training_job for m in fine_tunes} == {job.name for job in finished}
