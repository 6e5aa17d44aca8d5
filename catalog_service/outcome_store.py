"""Engine outcomes: what an engine did when a worker tried a model, persisted next to the models.

A worker reports each dry run, load and first generation step it tried
(`ReportEngineOutcome`); the `observed` compatibility rule reads them back.
One row per (model, engine, engine version, kind of device) in the
`engine_outcomes` table (`catalog_service.db.EngineOutcomeRow`): a new report
replaces the old one, whatever the old one said (latest wins). Rows go with
their model: the foreign key is ON DELETE CASCADE.

Like `CatalogStore`, `OutcomeStore` takes and returns protobuf messages (ORM
rows never leave this module), is synchronous (the catalog calls it in worker
threads) and raises `server_kit.errors` exceptions. It shares the catalog
store's engine: `OutcomeStore.of(store)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from google.protobuf import json_format
from sqlalchemy import Engine, bindparam, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from catalog_service import db
from catalog_service.db import EngineOutcomeRow, ModelRow
from catalog_service.store import MODEL_PREFIX, CatalogStore, Clock, model_id_of, utc_now
from modelyard.catalog.v1 import worker_pb2
from server_kit.database import write_session
from server_kit.errors import NotFound

MAX_ENGINE_BYTES = 256
"""Most UTF-8 bytes of an outcome's `engine` and `engine_version` (they are key columns)."""

MAX_ETAG_BYTES = 64
"""Most UTF-8 bytes of an outcome's `model_etag` (the catalog's etags have 16)."""

MAX_MESSAGE_CHARS = 2000
"""An outcome's `message` is kept up to this many characters (a longer one is cut, not refused)."""

_KEY = ("model_pk", "engine", "engine_version", "device_type")


class OutcomeStore:
    """Persistence of engine outcomes; `EngineOutcome` messages in and out.

    `engine`: the catalog database's engine (the same as the `CatalogStore`'s).
    `clock`: returns the current timezone-aware time; it stamps `report_time`.
    """

    def __init__(self, engine: Engine, *, clock: Clock | None = None) -> None:
        self.engine = engine
        self.clock: Clock = clock or utc_now
        self._sqlite = engine.dialect.name == "sqlite"
        self._read_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._outcomes_stmt = (
            select(EngineOutcomeRow.data)
            .join(ModelRow, ModelRow.id == EngineOutcomeRow.model_pk)
            .where(ModelRow.model_id == bindparam("model_id"))
            .order_by(EngineOutcomeRow.engine, EngineOutcomeRow.engine_version, EngineOutcomeRow.device_type)
        )

    @classmethod
    def of(cls, store: CatalogStore) -> OutcomeStore:
        """The outcome store on `store`'s database, with its clock."""
        return cls(store.engine, clock=store.clock)

    # ------------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with db.database_errors(), self._read_engine.connect() as conn:
            yield conn

    def _write(self) -> contextlib.AbstractContextManager[Session]:
        """A session in one transaction; on SQLite it holds the write lock from the start."""
        return write_session(self.engine, db.database_errors())

    def _upsert(self, values: dict[str, Any]) -> Any:
        """INSERT ... ON CONFLICT (key) DO UPDATE: one statement, atomic on both databases."""
        dialect = sqlite if self._sqlite else postgresql
        statement = dialect.insert(EngineOutcomeRow).values(**values)
        return statement.on_conflict_do_update(
            index_elements=list(_KEY), set_={k: v for k, v in values.items() if k not in _KEY}
        )

    # ------------------------------------------------------------------ outcomes

    def record_outcome(self, model_id: str, outcome: worker_pb2.EngineOutcome) -> worker_pb2.EngineOutcome:
        """Record `outcome` for `models/{model_id}`, replacing the one with the same engine,
        engine version and device type; returns it as stored.

        `report_time` is set to now; an empty `model_etag` becomes the model's
        current etag. The outcome is stored as given otherwise (the catalog
        validates it first: `Catalog.report_engine_outcome`). NotFound (reason
        MODEL_NOT_FOUND) when the model does not exist.
        """
        model_id = model_id_of(model_id)
        entry = worker_pb2.EngineOutcome()
        entry.CopyFrom(outcome)
        now = self.clock()
        entry.report_time.FromDatetime(now)
        try:
            with self._write() as session:
                found = session.execute(
                    select(ModelRow.id, ModelRow.etag).where(ModelRow.model_id == model_id)
                ).first()
                if found is None:
                    raise _model_not_found(model_id)
                if not entry.model_etag:
                    entry.model_etag = found.etag
                standing = self._standing_failure(session, found.id, entry)
                if standing is not None:
                    return standing
                session.execute(
                    self._upsert(
                        {
                            "model_pk": found.id,
                            "engine": entry.engine,
                            "engine_version": entry.engine_version,
                            "device_type": worker_pb2.DeviceType.Name(entry.device_type),
                            "supported": entry.supported,
                            "stage": worker_pb2.EngineOutcomeStage.Name(entry.stage),
                            "worker": entry.worker,
                            "model_etag": entry.model_etag,
                            "report_time": now,
                            "data": json_format.MessageToJson(entry, indent=None),
                        }
                    )
                )
        except IntegrityError as error:
            # The model was deleted between the lookup and the insert (PostgreSQL).
            raise _model_not_found(model_id) from error
        return entry

    @staticmethod
    def _standing_failure(
        session: Session, model_pk: int, entry: worker_pb2.EngineOutcome
    ) -> worker_pb2.EngineOutcome | None:
        """The recorded failure that `entry` must not replace, if any: a success at an earlier
        stage (a dry run) says nothing about a failure seen later (at the first step) on the
        same model files, so that failure stands."""
        if not entry.supported:
            return None
        row = session.execute(
            select(EngineOutcomeRow.data).where(
                EngineOutcomeRow.model_pk == model_pk,
                EngineOutcomeRow.engine == entry.engine,
                EngineOutcomeRow.engine_version == entry.engine_version,
                EngineOutcomeRow.device_type == worker_pb2.DeviceType.Name(entry.device_type),
            )
        ).scalar_one_or_none()
        if row is None:
            return None
        current = json_format.Parse(row, worker_pb2.EngineOutcome(), ignore_unknown_fields=True)
        if not current.supported and current.model_etag == entry.model_etag and current.stage > entry.stage:
            return current
        return None

    def outcomes_for(self, model_id: str) -> list[worker_pb2.EngineOutcome]:
        """Every outcome recorded for `models/{model_id}` (none for an unknown model), ordered by
        engine, engine version and device type. One indexed query."""
        with self._read() as conn:
            rows = conn.execute(self._outcomes_stmt, {"model_id": model_id_of(model_id)}).scalars().all()
        return [
            json_format.Parse(data, worker_pb2.EngineOutcome(), ignore_unknown_fields=True) for data in rows
        ]


def _model_not_found(model_id: str) -> NotFound:
    name = MODEL_PREFIX + model_id
    return NotFound(f"model {name} not found", reason="MODEL_NOT_FOUND", metadata={"model": name})


__all__ = ["MAX_ENGINE_BYTES", "MAX_ETAG_BYTES", "MAX_MESSAGE_CHARS", "OutcomeStore"]
