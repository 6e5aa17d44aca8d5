"""The job store: states, the atomic claim, leases, paging and filters, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Generator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from modelyard.trainer.v1 import trainer_service_pb2 as pb
from server_kit.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tests.trainer.conftest import postgres_url
from trainer_service import jobs
from trainer_service.db import migrate
from trainer_service.jobs import JobStore


def _postgres_database() -> Generator[str, None, None]:
    admin_url = postgres_url()
    try:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            name = f"trainer_test_{uuid.uuid4().hex[:8]}"
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:  # no server, no driver, no rights
        pytest.skip(f"PostgreSQL not reachable at {admin_url}: {type(error).__name__}")
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database: SQLite, and PostgreSQL when one is reachable."""
    if request.param == "sqlite":
        database = f"sqlite:///{tmp_path / 'trainer.db'}"
        migrate(database)
        yield database
        return
    generator = _postgres_database()
    database = next(generator)
    migrate(database)
    yield database
    generator.close()


@pytest.fixture
def store(url: str) -> Iterator[JobStore]:
    s = JobStore(url)
    yield s
    s.close()


def make_job(
    base: str = "models/tiny", method: pb.TrainingMethod.ValueType = pb.TRAINING_METHOD_LORA
) -> pb.TrainingJob:
    return pb.TrainingJob(base_model=base, method=method, dataset=pb.Dataset(source="/data/x.jsonl"))


def test_create_get_and_duplicates(store: JobStore) -> None:
    created = store.create("job-1", make_job(), {"base_model_path": "/m"})
    assert created.name == "trainingJobs/job-1"
    assert created.state == jobs.QUEUED
    assert created.HasField("create_time")
    assert store.get("job-1") == created
    assert store.get_spec("job-1") == {"base_model_path": "/m"}
    with pytest.raises(AlreadyExists):
        store.create("job-1", make_job())
    with pytest.raises(NotFound):
        store.get("nope")
    with pytest.raises(InvalidArgument):
        store.create("Bad_Id", make_job())


def test_two_active_jobs_cannot_register_the_same_output_model(store: JobStore) -> None:
    first = make_job()
    first.output_model_id = "tiny-ft"
    store.create("first", first)
    with pytest.raises(AlreadyExists) as error:
        store.create("second", first)
    assert error.value.reason == "OUTPUT_MODEL_CLAIMED"
    store.request_cancel("first")
    assert store.create("second", first).output_model_id == "tiny-ft"


def test_list_pages_newest_first_with_filters(store: JobStore) -> None:
    for i in range(5):
        store.create(f"job-{i}", make_job(base="models/a" if i % 2 else "models/b"))
    store.claim_next("w", 60)  # job-0 runs
    page, token = store.list_jobs(page_size=2)
    assert [j.name for j in page] == ["trainingJobs/job-4", "trainingJobs/job-3"]
    page2, token2 = store.list_jobs(page_size=2, page_token=token)
    page3, token3 = store.list_jobs(page_size=2, page_token=token2)
    assert [j.name for j in page2 + page3] == [
        "trainingJobs/job-2",
        "trainingJobs/job-1",
        "trainingJobs/job-0",
    ]
    assert token3 == ""
    running, _ = store.list_jobs(filter='state = "RUNNING"')
    assert [j.name for j in running] == ["trainingJobs/job-0"]
    on_a, _ = store.list_jobs(filter='base_model = "models/a" AND state = QUEUED AND method = "LORA"')
    assert [j.name for j in on_a] == ["trainingJobs/job-3", "trainingJobs/job-1"]
    with pytest.raises(InvalidArgument) as error:
        store.list_jobs(filter='state = "DONE"')
    assert error.value.reason == "INVALID_FILTER"
    with pytest.raises(InvalidArgument) as error:
        store.list_jobs(page_size=2, page_token=token, filter="state = QUEUED")
    assert error.value.reason == "INVALID_PAGE_TOKEN"


@pytest.mark.parametrize("key", [[2**64], [-(2**63) - 1], [], [1, 2], ["job-1"], [True], [1.5]])
def test_forged_page_tokens_are_invalid_argument(store: JobStore, key: list[object]) -> None:
    from server_kit import filtering, paging

    store.create("job-0", make_job())
    forged = paging.encode_page_token(key, filtering.canonical([]))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as error:
        store.list_jobs(page_size=2, page_token=forged)
    assert error.value.reason == "INVALID_PAGE_TOKEN"


def test_lifecycle_claim_progress_finish(store: JobStore) -> None:
    store.create("job-1", make_job(), {"k": "v"})
    claimed = store.claim_next("w1", 60)
    assert claimed is not None and claimed.job_id == "job-1" and claimed.spec == {"k": "v"}
    assert claimed.job.state == jobs.RUNNING and claimed.job.HasField("start_time")
    assert store.claim_next("w2", 60) is None

    progress = pb.TrainingProgress(step=2, total_steps=4, loss=1.5)
    assert store.record_progress("job-1", "w2", progress) is None  # not the owner
    updated = store.record_progress("job-1", "w1", progress, checkpoint_path="/c/checkpoint-2")
    assert (
        updated is not None and updated.progress.loss == 1.5 and updated.checkpoint_path == "/c/checkpoint-2"
    )
    evaluated = store.record_progress("job-1", "w1", pb.TrainingProgress(eval_loss=1.2))
    assert evaluated is not None and evaluated.progress.loss == 1.5 and evaluated.progress.eval_loss == 1.2

    assert store.finish("job-1", "w2", jobs.SUCCEEDED) is None
    done = store.finish("job-1", "w1", jobs.SUCCEEDED, output_model="models/out")
    assert done is not None and done.state == jobs.SUCCEEDED and done.output_model == "models/out"
    assert done.HasField("end_time")
    with pytest.raises(FailedPrecondition) as error:
        store.request_cancel("job-1")
    assert error.value.reason == "JOB_ALREADY_FINISHED"


def test_cancel_queued_ends_at_once_running_is_flagged(store: JobStore) -> None:
    store.create("queued", make_job())
    assert store.request_cancel("queued").state == jobs.CANCELLED
    store.create("running", make_job())
    assert store.claim_next("w", 60) is not None
    assert store.request_cancel("running").state == jobs.RUNNING
    lease = store.renew_lease("running", "w", 60)
    assert lease.owned and lease.cancel_requested


def test_requeue_for_resume_counts_and_failed_has_a_reason(store: JobStore) -> None:
    store.create("job", make_job())
    store.claim_next("w", 60)
    requeued = store.requeue("job", "w", resumed=True)
    assert requeued is not None and requeued.state == jobs.QUEUED and requeued.resume_count == 1
    claimed = store.claim_next("w", 60)
    assert claimed is not None and claimed.job.resume_count == 1
    failed = store.finish("job", "w", jobs.FAILED, reason="TRAINER_RESTARTED", message="no checkpoint")
    assert failed is not None and failed.error.reason == "TRAINER_RESTARTED"


def test_a_lapsed_lease_can_be_taken_over_once(store: JobStore) -> None:
    clock = [datetime(2030, 1, 1, tzinfo=UTC)]
    store.clock = lambda: clock[0]
    store.create("job", make_job())
    store.claim_next("dead", 10)
    clock[0] += timedelta(seconds=5)
    assert store.running_jobs(expired_before=clock[0]) == []
    clock[0] += timedelta(seconds=10)
    assert store.running_jobs(expired_before=clock[0]) == ["job"]
    assert store.take_over("job", "a", expired_before=clock[0], lease_seconds=10)
    assert not store.take_over("job", "b", expired_before=clock[0], lease_seconds=10)
    assert store.owner("job")[0] == "a"
    assert not store.renew_lease("job", "dead", 10).owned
    assert store.record_progress("job", "dead", pb.TrainingProgress(step=1)) is None


def test_concurrent_claims_never_hand_out_a_job_twice(url: str) -> None:
    """Several trainers (each its own engine) race for the queue: every job is claimed exactly once."""
    stores = [JobStore(url) for _ in range(4)]
    for i in range(12):
        stores[0].create(f"job-{i}", make_job())
    claims: list[tuple[str, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(len(stores) * 2)

    def claimer(store: JobStore, worker: str) -> None:
        start.wait()
        while True:
            claimed = store.claim_next(worker, 60)
            if claimed is None:
                return
            with lock:
                claims.append((claimed.job_id, worker))

    threads = [
        threading.Thread(target=claimer, args=(store, f"w{i}-{k}"))
        for i, store in enumerate(stores)
        for k in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    claimed_ids = sorted(job_id for job_id, _ in claims)
    assert claimed_ids == sorted(f"job-{i}" for i in range(12))
    for job_id, worker in claims:
        assert stores[0].owner(job_id)[0] == worker
    for store in stores:
        store.close()


def test_the_migrations_create_the_schema_the_code_uses(url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from trainer_service.db import VERSION_TABLE, Base, make_engine

    engine = make_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}), Base.metadata
        )
        tables = set(conn.dialect.get_table_names(conn))
    engine.dispose()
    assert diff == []
    assert {"training_jobs", VERSION_TABLE} <= tables
    assert "alembic_version" not in tables  # the catalog's version table stays free when sharing a database


def test_stored_job_strings_are_bounded_and_pages_sized_by_bytes(store: JobStore) -> None:
    from server_kit import paging

    huge = make_job()
    huge.labels["k"] = "v" * (1 << 20)
    with pytest.raises(InvalidArgument) as error:
        store.create("huge", huge)
    assert error.value.reason == "VALUE_TOO_LONG"
    huge = make_job()
    huge.dataset.source = "/d" * (1 << 20)
    with pytest.raises(InvalidArgument) as error:
        store.create("huge", huge)
    assert error.value.reason == "VALUE_TOO_LONG"

    count = paging.MAX_PAGE_BYTES // 100_000 + 10
    for index in range(count):
        job = make_job()
        for key in range(40):
            job.labels[f"k{key}"] = "v" * 2500
        store.create(f"job-{index:03d}", job)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        jobs, token = store.list_jobs(page_size=1000, page_token=token)
        pages += 1
        assert sum(j.ByteSize() for j in jobs) <= paging.MAX_PAGE_BYTES
        seen.extend(j.name for j in jobs)
        if not token:
            break
    assert pages >= 2 and len(seen) == count == len(set(seen))
