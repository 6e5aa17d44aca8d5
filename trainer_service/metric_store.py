"""The metric history of jobs: every logged step's metrics, kept in the job database.

`MetricStore` takes and returns `MetricPoint` messages; ORM rows never leave
this module. The manager records a point for every training step the worker
logs and for every evaluation; `ListTrainingMetrics` pages through them in
(step, kind) order. A step is kept once per kind: a job resumed from a
checkpoint redoes some steps and their new values replace the old ones.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime

from sqlalchemy import Engine, and_, delete, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from modelyard.trainer.v1 import trainer_service_pb2 as pb
from server_kit import paging
from server_kit.database import write_session
from trainer_service import db
from trainer_service.db import MetricRow

DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 5000
MAX_VALUES = 64
"""Metrics kept per point (a log entry with more keeps the first ones)."""


class MetricStore:
    """Metric points of training jobs in the trainer's SQL database."""

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] | None = None) -> None:
        self.engine = engine
        self.clock = clock or (lambda: datetime.now(UTC))

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with db.database_errors(), self.engine.connect() as conn:
            yield conn

    def _write(self) -> contextlib.AbstractContextManager[Session]:
        """A session in one transaction; on SQLite it holds the write lock from the start."""
        return write_session(self.engine, db.database_errors(), expire_on_commit=True)

    def record(
        self, job_id: str, kind: pb.MetricKind.ValueType, step: int, epoch: float, values: Mapping[str, float]
    ) -> None:
        """Keep the metrics logged at `step`, merged into those of the same step and kind.

        Two logs at one step (transformers' evaluation, then the task metrics) make one point;
        a resumed job redoing a step overwrites the values it logs again.
        """
        where = (MetricRow.job_id == job_id, MetricRow.step == step, MetricRow.kind == int(kind))
        with self._write() as session:
            existing = session.execute(select(MetricRow.data).where(*where)).scalar_one_or_none()
            merged = {**(json.loads(existing) if existing else {}), **values}
            kept = dict(list(merged.items())[:MAX_VALUES])
            session.execute(delete(MetricRow).where(*where))
            session.add(
                MetricRow(
                    job_id=job_id,
                    step=step,
                    kind=int(kind),
                    epoch=float(epoch),
                    time=self.clock(),
                    data=json.dumps(kept, sort_keys=True),
                )
            )

    def list_points(
        self, job_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[pb.MetricPoint], str]:
        """One page of the job's points in (step, kind) order, and the next page token."""
        size = paging.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        last = paging.decode_page_token(page_token, job_id, kinds=(int, int))
        statement = select(
            MetricRow.step, MetricRow.kind, MetricRow.epoch, MetricRow.time, MetricRow.data
        ).where(MetricRow.job_id == job_id)
        if last is not None:
            step, kind = int(last[0]), int(last[1])
            statement = statement.where(
                or_(MetricRow.step > step, and_(MetricRow.step == step, MetricRow.kind > kind))
            )
        statement = statement.order_by(MetricRow.step, MetricRow.kind).limit(size + 1)
        with self._read() as conn:
            rows = conn.execute(statement).all()
        points = []
        for row in rows[:size]:
            point = pb.MetricPoint(step=row.step, kind=row.kind, epoch=row.epoch)
            point.values.update({k: float(v) for k, v in json.loads(row.data).items()})
            point.time.FromDatetime(row.time)
            points.append(point)
        token = (
            paging.encode_page_token([rows[size - 1].step, rows[size - 1].kind], job_id)
            if len(rows) > size
            else ""
        )
        return points, token
