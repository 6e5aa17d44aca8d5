"""The job store: training jobs persisted with SQLAlchemy, and the queue they form.

`JobStore` takes and returns `modelyard.trainer.v1.TrainingJob` messages; ORM
rows never leave this module. Methods are synchronous (the manager calls them
through `asyncio.to_thread`) and raise `server_kit.errors` exceptions.

Lifecycle: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED. A RUNNING job
also goes back to QUEUED when it is to be resumed from a checkpoint (another
trainer, or this one after a restart, picks it up again).

Several trainers can share one database. A trainer takes a job with
`claim_next`, an atomic QUEUED -> RUNNING move that records the trainer's id and
a lease (`SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL, so concurrent
claimers skip each other's rows; on SQLite the write transaction holds the
database lock and the UPDATE is conditional on the state). The owner renews
the lease while the job runs; every later change of a RUNNING job is
conditional on the owner, so a trainer that lost its claim cannot overwrite a
job another trainer took over. A lapsed lease means the owner died: any
trainer may then recover the job.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import json_format
from sqlalchemy import ColumnElement, Engine, func, select, update
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from modelyard.trainer.v1 import trainer_service_pb2 as pb
from server_kit import filtering, paging
from server_kit.database import write_session
from server_kit.errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from server_kit.security import check_stored_strings
from trainer_service import db
from trainer_service.db import JobRow

JOB_ID_PATTERN = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
STATE_PREFIX = "TRAINING_JOB_STATE_"
METHOD_PREFIX = "TRAINING_METHOD_"
MAX_JOB_BYTES = 1024 * 1024
"""Bound of one stored job (its serialized proto); every string in it is bounded too."""
STRING_LIMITS = {"message": 16 * 1024}
"""Larger bounds than the default 4 KiB, by field name."""

QUEUED = pb.TRAINING_JOB_STATE_QUEUED
RUNNING = pb.TRAINING_JOB_STATE_RUNNING
SUCCEEDED = pb.TRAINING_JOB_STATE_SUCCEEDED
FAILED = pb.TRAINING_JOB_STATE_FAILED
CANCELLED = pb.TRAINING_JOB_STATE_CANCELLED
TERMINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})

FILTER_FIELDS = ("state", "base_model", "method")


def state_name(state: int) -> str:
    """`TRAINING_JOB_STATE_RUNNING` -> `RUNNING`."""
    return pb.TrainingJobState.Name(state).removeprefix(STATE_PREFIX)  # type: ignore[arg-type]


def method_name(method: int) -> str:
    """`TRAINING_METHOD_LORA` -> `LORA`."""
    return pb.TrainingMethod.Name(method).removeprefix(METHOD_PREFIX)  # type: ignore[arg-type]


def job_name(job_id: str) -> str:
    """`x` -> `trainingJobs/x`."""
    return f"trainingJobs/{job_id}"


def job_id_of(name: str, field_name: str = "name") -> str:
    """`trainingJobs/x` (or `x`) -> `x`; InvalidArgument when empty or malformed."""
    job_id = name.removeprefix("trainingJobs/")
    if not job_id:
        raise InvalidArgument(
            f"{field_name} is required (trainingJobs/{{job}})",
            reason="MISSING_FIELD",
            violations=[FieldViolation(field_name, "required")],
        )
    if not JOB_ID_PATTERN.match(job_id):
        raise InvalidArgument(
            f"{name!r} is not a training job name: trainingJobs/{{job}}, job matching "
            f"{JOB_ID_PATTERN.pattern}",
            reason="INVALID_NAME",
            violations=[
                FieldViolation(field_name, f"must be trainingJobs/{{job}} with {JOB_ID_PATTERN.pattern}")
            ],
        )
    return job_id


def check_job_id(job_id: str, field_name: str = "job_id") -> None:
    """InvalidArgument unless `job_id` is a valid id."""
    if not JOB_ID_PATTERN.match(job_id):
        raise InvalidArgument(
            f"job id {job_id!r} must match {JOB_ID_PATTERN.pattern} (lower case, digits, '-', 1-63 chars)",
            reason="INVALID_ID",
            violations=[FieldViolation(field_name, f"must match {JOB_ID_PATTERN.pattern}")],
        )


def new_job_id(method: int, now: datetime | None = None) -> str:
    """A fresh id such as `lora-20260101-120000-a1b2`."""
    now = now or datetime.now(UTC)
    return f"{method_name(method).lower()}-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class ClaimedJob:
    """A job a trainer took from the queue, with what it needs to run it."""

    job: pb.TrainingJob
    spec: dict[str, Any]

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self.job.name.removeprefix("trainingJobs/")


@dataclass(frozen=True)
class Lease:
    """What renewing a lease found: whether the trainer still owns the job, and whether a cancel is asked."""

    owned: bool
    cancel_requested: bool


class JobStore:
    """Training jobs in a SQL database (SQLite or PostgreSQL)."""

    def __init__(self, url: str | URL | Engine, *, clock: Callable[[], datetime] | None = None) -> None:
        self.engine = url if isinstance(url, Engine) else db.make_engine(url)
        self._postgres = self.engine.dialect.name == "postgresql"
        self.clock = clock or (lambda: datetime.now(UTC))

    def close(self) -> None:
        """Close the connection pool."""
        self.engine.dispose()

    # ------------------------------------------------------------------ plumbing

    def check(self) -> None:
        """Raise `Unavailable` unless the database answers (for health checks)."""
        with self._read() as conn:
            conn.execute(select(1)).scalar_one()

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with db.database_errors(), self.engine.connect() as conn:
            yield conn

    def _write(self) -> contextlib.AbstractContextManager[Session]:
        """A session in one transaction; on SQLite it holds the write lock from the start."""
        return write_session(self.engine, db.database_errors())

    @staticmethod
    def _parse(data: str) -> pb.TrainingJob:
        return json_format.Parse(data, pb.TrainingJob(), ignore_unknown_fields=True)

    @staticmethod
    def _dump(job: pb.TrainingJob) -> str:
        return json_format.MessageToJson(job, indent=None, preserving_proto_field_name=True)

    def _locked_row(self, session: Session, job_id: str) -> JobRow:
        statement = select(JobRow).where(JobRow.job_id == job_id)
        if self._postgres:
            statement = statement.with_for_update()
        row = session.execute(statement).scalar_one_or_none()
        if row is None:
            raise NotFound(
                f"training job {job_name(job_id)} not found",
                reason="JOB_NOT_FOUND",
                metadata={"job": job_name(job_id)},
            )
        return row

    def _save(self, row: JobRow, job: pb.TrainingJob, now: datetime) -> pb.TrainingJob:
        row.state = state_name(job.state)
        row.update_time = now
        row.data = self._dump(job)
        return job

    # ------------------------------------------------------------------ create / read

    def create(self, job_id: str, job: pb.TrainingJob, spec: dict[str, Any] | None = None) -> pb.TrainingJob:
        """Store a new QUEUED job `trainingJobs/{job_id}`; AlreadyExists when the id is taken."""
        check_job_id(job_id)
        now = self.clock()
        entry = pb.TrainingJob()
        entry.CopyFrom(job)
        entry.name = job_name(job_id)
        entry.state = QUEUED
        entry.create_time.FromDatetime(now)
        for name in ("start_time", "end_time", "error", "progress"):
            entry.ClearField(name)
        check_stored_strings(entry, "job", total_limit=MAX_JOB_BYTES, limits=STRING_LIMITS)
        entry.output_model = ""
        entry.resume_count = 0
        entry.checkpoint_path = ""
        row = JobRow(
            job_id=job_id,
            state=state_name(QUEUED),
            base_model=entry.base_model,
            method=method_name(entry.method),
            output_model_id=entry.output_model_id,
            worker_id=None,
            lease_expire_time=None,
            cancel_requested=False,
            create_time=now,
            update_time=now,
            spec=json.dumps(spec or {}),
            data=self._dump(entry),
        )
        try:
            with self._write() as session:
                if entry.output_model_id:
                    self._check_output_unclaimed(session, entry.output_model_id)
                session.add(row)
        except IntegrityError as error:
            raise AlreadyExists(
                f"training job {entry.name} already exists",
                reason="JOB_ALREADY_EXISTS",
                metadata={"job": entry.name},
            ) from error
        return entry

    @staticmethod
    def _check_output_unclaimed(session: Session, output_model_id: str) -> None:
        """AlreadyExists when a queued or running job will register the same output model."""
        other = session.execute(
            select(JobRow.job_id).where(
                JobRow.output_model_id == output_model_id,
                JobRow.state.in_([state_name(QUEUED), state_name(RUNNING)]),
            )
        ).first()
        if other is not None:
            raise AlreadyExists(
                f"job {job_name(other.job_id)} will already register models/{output_model_id}; "
                "choose another output_model_id",
                reason="OUTPUT_MODEL_CLAIMED",
                metadata={"job": job_name(other.job_id), "model": f"models/{output_model_id}"},
                violations=[FieldViolation("job.output_model_id", "taken by a queued or running job")],
            )

    def get(self, job_id: str) -> pb.TrainingJob:
        """The job `trainingJobs/{job_id}`; NotFound when absent."""
        with self._read() as conn:
            data = conn.execute(select(JobRow.data).where(JobRow.job_id == job_id)).scalar_one_or_none()
        if data is None:
            raise NotFound(
                f"training job {job_name(job_id)} not found",
                reason="JOB_NOT_FOUND",
                metadata={"job": job_name(job_id)},
            )
        return self._parse(data)

    def get_spec(self, job_id: str) -> dict[str, Any]:
        """What the job needs to run (stored at creation)."""
        with self._read() as conn:
            spec = conn.execute(select(JobRow.spec).where(JobRow.job_id == job_id)).scalar_one_or_none()
        if spec is None:
            raise NotFound(f"training job {job_name(job_id)} not found", reason="JOB_NOT_FOUND")
        return dict(json.loads(spec))

    def list_jobs(
        self, *, page_size: int = 0, page_token: str = "", filter: str = ""
    ) -> tuple[list[pb.TrainingJob], str]:
        """One page of jobs, newest first, matching `filter`; returns the jobs and the next page token."""
        size = paging.page_size(page_size)
        terms = filtering.parse_filter(filter, FILTER_FIELDS)
        query = filtering.canonical(terms)
        last = paging.decode_page_token(page_token, query, kinds=(int,))
        conditions = [self._condition(term) for term in terms]
        # Sizes first, then the data of the jobs that fit: pages are bounded by bytes too.
        statement = select(JobRow.id, func.length(JobRow.data).label("size")).where(*conditions)
        if last is not None:
            statement = statement.where(JobRow.id < int(last[0]))
        statement = statement.order_by(JobRow.id.desc()).limit(size + 1)
        with self._read() as conn:
            listed = conn.execute(statement).all()
            count, more = paging.fit_page((int(row.size or 0) for row in listed), size)
            ids = [row.id for row in listed[:count]]
            rows = (
                conn.execute(select(JobRow.data).where(JobRow.id.in_(ids)).order_by(JobRow.id.desc())).all()
                if ids
                else []
            )
        jobs = [self._parse(row.data) for row in rows]
        token = paging.encode_page_token([ids[-1]], query) if more and ids else ""
        return jobs, token

    @staticmethod
    def _condition(term: filtering.Term) -> ColumnElement[bool]:
        if term.op == filtering.HAS:
            raise filtering.filter_error(f"use = or != with {term.field!r}")
        value = term.value
        column: Any
        if term.field == "state":
            value = value.upper().removeprefix(STATE_PREFIX)
            if value not in {state_name(s) for s in pb.TrainingJobState.values() if s}:
                raise filtering.filter_error(
                    f"unknown state {term.value!r}; use QUEUED, RUNNING, SUCCEEDED, FAILED or CANCELLED"
                )
            column = JobRow.state
        elif term.field == "method":
            value = value.upper().removeprefix(METHOD_PREFIX)
            if value not in {method_name(m) for m in pb.TrainingMethod.values() if m}:
                raise filtering.filter_error(f"unknown method {term.value!r}; use LORA, QLORA, FULL or DPO")
            column = JobRow.method
        else:
            value = value if value.startswith("models/") else f"models/{value}"
            column = JobRow.base_model
        return column == value if term.op == filtering.EQ else column != value

    def count_by_state(self) -> dict[str, int]:
        """Number of jobs per state name (for load reports)."""
        with self._read() as conn:
            rows = conn.execute(select(JobRow.state, func.count()).group_by(JobRow.state)).all()
        return {state: int(count) for state, count in rows}

    # ------------------------------------------------------------------ the queue

    def claim_next(self, worker_id: str, lease_seconds: float) -> ClaimedJob | None:
        """Atomically move the oldest QUEUED job to RUNNING for `worker_id`; None when the queue is empty."""
        now = self.clock()
        with self._write() as session:
            statement = select(JobRow).where(JobRow.state == state_name(QUEUED)).order_by(JobRow.id).limit(1)
            if self._postgres:
                statement = statement.with_for_update(skip_locked=True)
            row = session.execute(statement).scalar_one_or_none()
            if row is None:
                return None
            # Conditional on the state: on SQLite the write lock already excludes other claimers,
            # on PostgreSQL the row lock does; the condition keeps it correct on any backend.
            result = session.execute(
                update(JobRow)
                .where(JobRow.id == row.id, JobRow.state == state_name(QUEUED))
                .values(
                    state=state_name(RUNNING),
                    worker_id=worker_id,
                    lease_expire_time=now + timedelta(seconds=lease_seconds),
                    update_time=now,
                )
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
            job = self._parse(row.data)
            job.state = RUNNING
            if not job.HasField("start_time"):
                job.start_time.FromDatetime(now)
            session.execute(
                update(JobRow)
                .where(JobRow.id == row.id)
                .values(data=self._dump(job))
                .execution_options(synchronize_session=False)
            )
            return ClaimedJob(job, dict(json.loads(row.spec)))

    def renew_lease(self, job_id: str, worker_id: str, lease_seconds: float) -> Lease:
        """Extend `worker_id`'s claim on a RUNNING job; says whether it still owns it and if to cancel."""
        now = self.clock()
        with self._write() as session:
            result = session.execute(
                update(JobRow)
                .where(
                    JobRow.job_id == job_id,
                    JobRow.state == state_name(RUNNING),
                    JobRow.worker_id == worker_id,
                )
                .values(lease_expire_time=now + timedelta(seconds=lease_seconds))
                .execution_options(synchronize_session=False)
            )
            owned = result.rowcount == 1  # type: ignore[attr-defined]
            cancel = session.execute(
                select(JobRow.cancel_requested).where(JobRow.job_id == job_id)
            ).scalar_one_or_none()
        return Lease(owned, bool(cancel))

    def _mutate_owned(
        self, job_id: str, worker_id: str, change: Callable[[JobRow, pb.TrainingJob, datetime], None]
    ) -> pb.TrainingJob | None:
        """Apply `change` to a RUNNING job owned by `worker_id`; None when it is not (any more)."""
        now = self.clock()
        with self._write() as session:
            row = self._locked_row(session, job_id)
            if row.state != state_name(RUNNING) or row.worker_id != worker_id:
                return None
            job = self._parse(row.data)
            change(row, job, now)
            return self._save(row, job, now)

    def record_progress(
        self,
        job_id: str,
        worker_id: str,
        progress: pb.TrainingProgress | None = None,
        *,
        checkpoint_path: str | None = None,
        reset: Sequence[str] = (),
    ) -> pb.TrainingJob | None:
        """Store the latest progress and/or checkpoint.

        Progress is merged (fields not set keep their value) after clearing the `reset` fields.
        """

        def change(row: JobRow, job: pb.TrainingJob, now: datetime) -> None:
            for name in reset:
                job.progress.ClearField(name)  # type: ignore[arg-type]
            if progress is not None:
                job.progress.MergeFrom(progress)
            if checkpoint_path is not None:
                job.checkpoint_path = checkpoint_path

        return self._mutate_owned(job_id, worker_id, change)

    def finish(
        self,
        job_id: str,
        worker_id: str,
        state: int,
        *,
        reason: str = "",
        message: str = "",
        output_model: str = "",
    ) -> pb.TrainingJob | None:
        """End a RUNNING job owned by `worker_id` as SUCCEEDED, FAILED or CANCELLED."""
        if state not in TERMINAL_STATES:
            raise ValueError(f"{state_name(state)} is not a final state")

        def change(row: JobRow, job: pb.TrainingJob, now: datetime) -> None:
            job.state = state  # type: ignore[assignment]
            job.end_time.FromDatetime(now)
            if state == FAILED:
                job.error.reason = reason or "TRAINING_FAILED"
                job.error.message = message
            if output_model:
                job.output_model = output_model
            if state == SUCCEEDED and job.progress.total_steps:
                job.progress.ClearField("eta")
            # worker_id stays: on a finished job it names the trainer that ran it (see `owner`).
            row.lease_expire_time = None

        return self._mutate_owned(job_id, worker_id, change)

    def requeue(self, job_id: str, worker_id: str, *, resumed: bool) -> pb.TrainingJob | None:
        """Put a RUNNING job owned by `worker_id` back in the queue (to resume from its checkpoint).

        `resumed` counts the move in `resume_count` (a restart after a crash);
        a graceful hand-back on shutdown does not.
        """

        def change(row: JobRow, job: pb.TrainingJob, now: datetime) -> None:
            job.state = QUEUED
            if resumed:
                job.resume_count += 1
            job.progress.ClearField("eta")
            row.worker_id = None
            row.lease_expire_time = None

        return self._mutate_owned(job_id, worker_id, change)

    def request_cancel(self, job_id: str) -> pb.TrainingJob:
        """Cancel a job: a QUEUED one ends CANCELLED now; a RUNNING one is flagged for its trainer.

        FailedPrecondition (reason JOB_ALREADY_FINISHED) for a finished job.
        """
        now = self.clock()
        with self._write() as session:
            row = self._locked_row(session, job_id)
            job = self._parse(row.data)
            if job.state in TERMINAL_STATES:
                raise FailedPrecondition(
                    f"training job {job.name} already ended {state_name(job.state)}",
                    reason="JOB_ALREADY_FINISHED",
                    metadata={"job": job.name, "state": state_name(job.state)},
                )
            row.cancel_requested = True
            if job.state == QUEUED:
                job.state = CANCELLED
                job.end_time.FromDatetime(now)
            return self._save(row, job, now)

    def running_jobs(
        self, *, worker_id: str | None = None, expired_before: datetime | None = None
    ) -> list[str]:
        """Ids of RUNNING jobs owned by `worker_id`, or whose lease lapsed before `expired_before`."""
        statement = select(JobRow.job_id).where(JobRow.state == state_name(RUNNING))
        if worker_id is not None:
            statement = statement.where(JobRow.worker_id == worker_id)
        if expired_before is not None:
            statement = statement.where(JobRow.lease_expire_time < expired_before)
        with self._read() as conn:
            return [job_id for (job_id,) in conn.execute(statement.order_by(JobRow.id)).all()]

    def owner(self, job_id: str) -> tuple[str | None, datetime | None]:
        """The trainer that holds a job and until when its lease runs.

        For a finished job: the trainer that ran it last, and None; for a queued one: None, None.
        """
        with self._read() as conn:
            row = conn.execute(
                select(JobRow.worker_id, JobRow.lease_expire_time).where(JobRow.job_id == job_id)
            ).one_or_none()
        if row is None:
            raise NotFound(f"training job {job_name(job_id)} not found", reason="JOB_NOT_FOUND")
        return row.worker_id, row.lease_expire_time

    def take_over(
        self, job_id: str, worker_id: str, *, expired_before: datetime, lease_seconds: float
    ) -> bool:
        """Claim a RUNNING job whose owner's lease lapsed (the owner died); True when this call won it."""
        now = self.clock()
        with self._write() as session:
            result = session.execute(
                update(JobRow)
                .where(
                    JobRow.job_id == job_id,
                    JobRow.state == state_name(RUNNING),
                    JobRow.lease_expire_time < expired_before,
                )
                .values(worker_id=worker_id, lease_expire_time=now + timedelta(seconds=lease_seconds))
                .execution_options(synchronize_session=False)
            )
            return result.rowcount == 1  # type: ignore[attr-defined]
