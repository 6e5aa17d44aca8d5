"""Workers in the catalog's store: registration, heartbeats, sweeping, listing.

`WorkerStore` is mixed into `store.CatalogStore`, which provides the database
plumbing (`_read`, `_write`, `_lock`), the clock, the heartbeat TTL and retention,
and the byte-bounded cache of parsed workers. A worker is stored as JSON (`data`)
beside indexed columns; the state it reports (HEALTHY or DRAINING) is stored, and
whether it is UNAVAILABLE is derived at read time from its last heartbeat.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format
from sqlalchemy import ColumnElement, and_, delete, false, func, not_, select, true
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from catalog_service.db import WorkerRow
from catalog_service.entry_cache import ParsedCache
from catalog_service.store_common import (
    MAX_INDEXED_BYTES,
    MAX_WORKER_BYTES,
    WORKER_FILTER_FIELDS,
    WORKER_PREFIX,
    Clock,
    check_bytes,
    check_enum,
    check_id,
    check_strings,
    enum_value,
    negate,
    string_match,
    to_json,
    worker_id_of,
)
from modelyard.catalog.v1 import worker_pb2
from server_kit import filtering, paging
from server_kit.errors import FieldViolation, InvalidArgument, NotFound
from server_kit.filtering import Term, filter_error


class WorkerStore:
    """The worker half of `CatalogStore` (see the module docstring)."""

    clock: Clock
    heartbeat_ttl: float
    worker_retention: float
    _worker_cache: ParsedCache
    _get_worker_stmt: Any

    if TYPE_CHECKING:

        def _read(self) -> contextlib.AbstractContextManager[Connection]: ...

        def _write(self) -> contextlib.AbstractContextManager[Session]: ...

        def _lock(self, statement: Any) -> Any: ...

    def _parse_worker(self, worker_id: str, data: str, now: datetime) -> worker_pb2.Worker:
        return self._derive_state(self._worker_entry(worker_id, data), now)

    def _worker_entry(self, worker_id: str, data: str) -> worker_pb2.Worker:
        # Worker rows change with every heartbeat: the JSON itself is the cache check.
        return self._worker_cache.parse(
            worker_pb2.Worker,
            worker_id,
            data,
            lambda: json_format.Parse(data, worker_pb2.Worker(), ignore_unknown_fields=True),
        )

    # ------------------------------------------------------------------ workers

    def upsert_worker(self, worker_id: str, worker: worker_pb2.Worker) -> worker_pb2.Worker:
        """Register `workers/{worker_id}` or refresh its registration (create_time is kept).

        Registering counts as a heartbeat. The stored state is DRAINING when the
        worker says so, HEALTHY otherwise.
        """
        worker_id = worker_id_of(worker_id)
        check_id(worker_id, "worker", "worker_id")
        entry = worker_pb2.Worker()
        entry.CopyFrom(worker)
        entry.name = WORKER_PREFIX + worker_id
        if entry.state != worker_pb2.WORKER_STATE_DRAINING:
            entry.state = worker_pb2.WORKER_STATE_HEALTHY
        check_bytes("worker.capabilities.engine", entry.capabilities.engine, MAX_INDEXED_BYTES)
        check_strings(entry, "worker", MAX_WORKER_BYTES)
        self.sweep_workers()  # registrations are what adds rows: each one clears expired ones
        for attempt in range(3):
            now = self.clock()
            entry.last_heartbeat_time.FromDatetime(now)
            try:
                with self._write() as session:
                    row = session.scalars(
                        self._lock(select(WorkerRow).where(WorkerRow.worker_id == worker_id))
                    ).first()
                    if row is None:
                        entry.create_time.FromDatetime(now)
                        row = WorkerRow(worker_id=worker_id, create_time=now)
                        session.add(row)
                    else:
                        entry.create_time.FromDatetime(row.create_time)
                    self._fill_worker_row(row, entry, now)
                return self._derive_state(entry, now)
            except IntegrityError:
                # Two registrations of a new id raced; the loser updates the winner's row.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def heartbeat(
        self,
        worker_id: str,
        load: worker_pb2.WorkerLoad | None = None,
        free_memory_bytes: int | None = None,
        loaded_models: Sequence[worker_pb2.LoadedModel] | None = None,
        state: int = worker_pb2.WORKER_STATE_UNSPECIFIED,
    ) -> worker_pb2.Worker:
        """Record a heartbeat: load, free memory, loaded models and HEALTHY/DRAINING.

        Arguments left None (or state UNSPECIFIED) keep their stored values. An
        unknown worker is NotFound (reason WORKER_NOT_FOUND): it must register again.
        """
        worker_id = worker_id_of(worker_id)
        if state not in (
            worker_pb2.WORKER_STATE_UNSPECIFIED,
            worker_pb2.WORKER_STATE_HEALTHY,
            worker_pb2.WORKER_STATE_DRAINING,
        ):
            raise InvalidArgument(
                "a heartbeat reports HEALTHY or DRAINING; UNAVAILABLE is decided by the catalog",
                reason="INVALID_WORKER_STATE",
                violations=[FieldViolation("state", "must be HEALTHY, DRAINING or unset")],
            )
        now = self.clock()
        with self._write() as session:
            row = session.scalars(
                self._lock(select(WorkerRow).where(WorkerRow.worker_id == worker_id))
            ).first()
            if row is None:
                raise self._worker_not_found(worker_id)
            entry = self._worker_entry(worker_id, row.data)
            if load is not None:
                entry.load.CopyFrom(load)
            if free_memory_bytes is not None:
                entry.device.free_memory_bytes = free_memory_bytes
            if loaded_models is not None:
                del entry.loaded_models[:]
                entry.loaded_models.extend(loaded_models)
            if state != worker_pb2.WORKER_STATE_UNSPECIFIED:
                entry.state = state  # type: ignore[assignment]
            entry.last_heartbeat_time.FromDatetime(now)
            check_strings(entry, "worker", MAX_WORKER_BYTES)
            self._fill_worker_row(row, entry, now)
        return self._derive_state(entry, now)

    def sweep_workers(self) -> list[str]:
        """Delete the workers whose last heartbeat is older than `worker_retention` seconds.

        An expired worker shows as UNAVAILABLE for a while (routing and operators see
        it went away), then its row goes: registrations cannot pile up rows forever. A
        worker that comes back later registers again (its heartbeat answers
        WORKER_NOT_FOUND). Returns the names deleted.
        """
        cutoff = self.clock() - timedelta(seconds=self.worker_retention)
        with self._write() as session:
            gone = session.scalars(
                select(WorkerRow.worker_id).where(WorkerRow.last_heartbeat_time < cutoff)
            ).all()
            if gone:
                session.execute(delete(WorkerRow).where(WorkerRow.worker_id.in_(gone)))
        self._worker_cache.discard(gone)
        return [WORKER_PREFIX + worker_id for worker_id in sorted(gone)]

    def delete_worker(self, worker_id: str) -> None:
        """Remove a worker's registration (NotFound, reason WORKER_NOT_FOUND, if absent)."""
        worker_id = worker_id_of(worker_id)
        with self._write() as session:
            result = session.execute(delete(WorkerRow).where(WorkerRow.worker_id == worker_id))
            if getattr(result, "rowcount", 0) == 0:
                raise self._worker_not_found(worker_id)

    def get_worker(self, worker_id: str) -> worker_pb2.Worker:
        """The worker `workers/{worker_id}` with its derived state."""
        worker_id = worker_id_of(worker_id)
        with self._read() as conn:
            data = conn.execute(self._get_worker_stmt, {"worker_id": worker_id}).scalar()
        if data is None:
            raise self._worker_not_found(worker_id)
        return self._parse_worker(worker_id, data, self.clock())

    def list_workers(
        self, page_size: int = 0, page_token: str = "", filter: str = ""
    ) -> tuple[list[worker_pb2.Worker], str]:
        """One page of workers ordered by id, and the next page's token ('' at the end).

        `filter` fields: name (prefix with `*`), role, engine, state (the derived
        state: `state = UNAVAILABLE` finds workers whose heartbeat lapsed).
        """
        size = paging.page_size(page_size)
        terms = filtering.parse_filter(filter, WORKER_FILTER_FIELDS)
        query = "workers?" + filtering.canonical(terms)
        last = paging.decode_page_token(page_token, query, kinds=(str,))
        now = self.clock()
        conditions = [self._worker_condition(term, now) for term in terms]
        if last is not None:
            conditions.append(WorkerRow.worker_id > str(last[0]))
        sizes = (
            select(WorkerRow.worker_id, func.length(WorkerRow.data).label("size"))
            .where(and_(true(), *conditions))
            .order_by(WorkerRow.worker_id)
            .limit(size + 1)
        )
        with self._read() as conn:
            listed = conn.execute(sizes).all()
            count, more = paging.fit_page((int(r.size or 0) for r in listed), size)
            ids = [r.worker_id for r in listed[:count]]
            rows = (
                conn.execute(
                    select(WorkerRow.worker_id, WorkerRow.data)
                    .where(WorkerRow.worker_id.in_(ids))
                    .order_by(WorkerRow.worker_id)
                ).all()
                if ids
                else []
            )
        workers = [self._parse_worker(r.worker_id, r.data, now) for r in rows]
        next_token = paging.encode_page_token([ids[-1]], query) if more and ids else ""
        return workers, next_token

    def all_workers(self) -> list[worker_pb2.Worker]:
        """Every registered worker, ordered by id, with derived states (for routing)."""
        now = self.clock()
        with self._read() as conn:
            rows = conn.execute(
                select(WorkerRow.worker_id, WorkerRow.data).order_by(WorkerRow.worker_id)
            ).all()
        return [self._parse_worker(r.worker_id, r.data, now) for r in rows]

    # ------------------------------------------------------------------ worker helpers

    @staticmethod
    def _fill_worker_row(row: WorkerRow, entry: worker_pb2.Worker, now: datetime) -> None:
        check_enum(worker_pb2.WorkerRole, entry.role, "worker.role")
        check_enum(worker_pb2.WorkerState, entry.state, "worker.state")
        row.role = worker_pb2.WorkerRole.Name(entry.role)
        row.engine = entry.capabilities.engine
        row.address = entry.address
        row.state = worker_pb2.WorkerState.Name(entry.state)
        row.last_heartbeat_time = now
        row.data = to_json(entry)

    def _derive_state(self, worker: worker_pb2.Worker, now: datetime) -> worker_pb2.Worker:
        beat = worker.last_heartbeat_time.seconds + worker.last_heartbeat_time.nanos / 1e9
        if now.timestamp() - beat > self.heartbeat_ttl:
            worker.state = worker_pb2.WORKER_STATE_UNAVAILABLE
        return worker

    def _worker_condition(self, term: Term, now: datetime) -> ColumnElement[bool]:
        field = term.field
        if field == "name":
            value = term.value.removeprefix(WORKER_PREFIX)
            return negate(term, string_match(WorkerRow.worker_id, Term(field, term.op, value)))
        if field == "role":
            value = enum_value(worker_pb2.WorkerRole, "WORKER_ROLE_", field, term.value)
            return negate(term, WorkerRow.role == value)
        if field == "engine":
            return negate(term, string_match(WorkerRow.engine, term))
        if field == "state":
            value = enum_value(worker_pb2.WorkerState, "WORKER_STATE_", field, term.value)
            cutoff = now - timedelta(seconds=self.heartbeat_ttl)
            lapsed = WorkerRow.last_heartbeat_time < cutoff
            condition: ColumnElement[bool]
            if value == "WORKER_STATE_UNAVAILABLE":
                condition = lapsed
            elif value == "WORKER_STATE_UNSPECIFIED":
                condition = false()
            else:
                condition = and_(WorkerRow.state == value, not_(lapsed))
            return negate(term, condition)
        raise filter_error(f"unknown filter field {field!r}")  # pragma: no cover - parse_filter checks

    @staticmethod
    def _worker_not_found(worker_id: str) -> NotFound:
        name = WORKER_PREFIX + worker_id
        return NotFound(
            f"worker {name} not found; a worker registers again after this",
            reason="WORKER_NOT_FOUND",
            metadata={"worker": name},
        )
