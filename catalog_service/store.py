"""The catalog store: models and workers, persisted with SQLAlchemy.

`CatalogStore` takes and returns `modelyard.catalog.v1` protobuf messages; ORM
rows never leave this module. A model row keeps the full proto serialized
(`entry`), a worker row as JSON (`data`); both copy the fields that filters,
lineage and versioning need into indexed columns. Methods are synchronous (the
servicer calls them through `asyncio.to_thread`) and raise `server_kit.errors`
exceptions.

Reads are one indexed lookup and a parse of the stored bytes (~1 µs for a
typical LLM entry; JSON took ~200 µs): the cost of a read does not depend on
how many entries the catalog holds or on which were read before, so models
need no cache. A page of `ListModels` is one query in the usual case (see
`list_models`). Workers, stored as JSON and read on every routing decision,
are parsed through a cache bounded by bytes (`entry_cache.ParsedCache`).

Workers: the state a worker reports (HEALTHY or DRAINING) is stored; whether
it is UNAVAILABLE is derived at read time from its last heartbeat and the
store's `heartbeat_ttl`, and it comes back with its next heartbeat. A worker
silent for `worker_retention` (10 TTLs) is swept (`sweep_workers`, run at every
registration and periodically by the app); it registers again when it returns.

Bounds: every string stored in a model or worker is bounded (`MAX_STRING_BYTES`,
more for free text: `STRING_LIMITS`), and so is each whole entry; listings are
cut by bytes (`paging.MAX_PAGE_BYTES`) as well as by count.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Engine,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from catalog_service import db
from catalog_service.db import ModelLabelRow, ModelRow, ModelTagRow, WorkerRow
from catalog_service.entry_cache import DEFAULT_MAX_BYTES, ParsedCache
from catalog_service.fast_reads import PostgresLookups, SqliteLookups
from catalog_service.store_common import (
    CONFIG_KINDS,
    ID_PATTERN,
    MAX_INDEXED_BYTES,
    MAX_LABEL_KEY_CHARS,
    MAX_LABEL_VALUE_CHARS,
    MAX_MODEL_BYTES,
    MAX_TAG_CHARS,
    MODEL_FILTER_FIELDS,
    MODEL_PREFIX,
    UNFINISHED_STATES,
    UPDATABLE_MODEL_PATHS,
    WORKER_FILTER_FIELDS,
    WORKER_RETENTION_TTLS,
    Clock,
    check_bytes,
    check_enum,
    check_id,
    check_strings,
    enum_value,
    model_id_of,
    negate,
    new_etag,
    source_column,
    string_match,
    utc_now,
    worker_id_of,
)
from catalog_service.worker_store import WorkerStore
from modelyard.catalog.v1 import model_pb2
from server_kit import filtering, paging
from server_kit.database import write_session
from server_kit.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from server_kit.filtering import Term, filter_error

_GET_MODEL_SQL = "SELECT entry FROM models WHERE model_id = ?"
_GET_MODEL_PG_SQL = "SELECT entry FROM models WHERE model_id = %s"
_LIST_MODELS_PG_SQL = (
    "SELECT model_id, length(entry), CASE WHEN length(entry) <= %s THEN entry END "
    "FROM models WHERE model_id > %s ORDER BY model_id LIMIT %s"
)
_LIST_MODELS_SQL = (
    "SELECT model_id, length(entry), CASE WHEN length(entry) <= ? THEN entry END "
    "FROM models WHERE model_id > ? ORDER BY model_id LIMIT ?"
)
"""The unfiltered ListModels page on SQLite, as `CatalogStore._list_models_stmt` compiles."""


@dataclass(frozen=True)
class _PageRequest:
    """One ListModels page asked for: size, filter terms, the query its token is bound to,
    and the id it starts after."""

    size: int
    terms: list[Term]
    query: str
    after: str

    @property
    def params(self) -> tuple[int, str, int]:
        """(inline, after, limit) of the page query. One query reads ids, sizes and the
        entries themselves, except those too large to be worth reading before the page
        is known to hold them (more than an even share of the page's byte budget):
        those are read by a second query."""
        return paging.MAX_PAGE_BYTES // (self.size + 1), self.after, self.size + 1

    def fit(self, rows: Sequence[tuple[Any, ...]]) -> tuple[Sequence[tuple[Any, ...]], bool]:
        """The rows (id, size, entry or None) that make the page, and whether more follow."""
        count, more = paging.fit_page((int(size or 0) for _id, size, _entry in rows), self.size)
        return rows[:count], more

    def finish(
        self, page: Sequence[tuple[Any, ...]], more: bool, large: dict[str, bytes]
    ) -> tuple[list[model_pb2.Model], str]:
        """The page's models (entries read apart in `large`) and the next page's token."""
        models = [
            model_pb2.Model.FromString(entry if entry is not None else large[model_id])
            for model_id, _size, entry in page
            if entry is not None or model_id in large  # deleted since the first query: skipped
        ]
        next_token = paging.encode_page_token([page[-1][0]], self.query) if more and page else ""
        return models, next_token


class CatalogStore(WorkerStore):
    """Persistence of models and workers; protobuf messages in, protobuf messages out.

    `url`: a SQLAlchemy URL (`sqlite:///path/catalog.db`, `postgresql+psycopg://...`).
    `heartbeat_ttl`: seconds after the last heartbeat that a worker turns UNAVAILABLE.
    `worker_retention`: seconds after the last heartbeat that its row is swept (default
    `WORKER_RETENTION_TTLS` TTLs).
    `clock`: returns the current timezone-aware time (tests pass a fake one).
    `auto_migrate`: upgrade the schema to the latest revision on construction.
    `worker_cache_bytes`: memory the parsed-worker cache may hold (0 disables it;
    see `entry_cache` for what one entry costs).
    """

    def __init__(
        self,
        url: str | URL,
        *,
        heartbeat_ttl: float = 30.0,
        worker_retention: float | None = None,
        clock: Clock | None = None,
        auto_migrate: bool = True,
        worker_cache_bytes: int = DEFAULT_MAX_BYTES,
        engine: Engine | None = None,
    ) -> None:
        self.engine = engine or db.make_engine(url)
        self.heartbeat_ttl = float(heartbeat_ttl)
        self.worker_retention = float(
            worker_retention if worker_retention is not None else WORKER_RETENTION_TTLS * self.heartbeat_ttl
        )
        self.clock: Clock = clock or utc_now
        self._sqlite = self.engine.dialect.name == "sqlite"
        self._postgres = self.engine.dialect.name == "postgresql"
        # Reads run in autocommit: one round trip, no BEGIN/ROLLBACK around a lookup
        # (each statement sees a consistent snapshot on its own, on both databases).
        self._read_engine = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._worker_cache = ParsedCache(worker_cache_bytes)
        self._get_model_stmt = select(ModelRow.entry).where(ModelRow.model_id == bindparam("model_id"))
        size = func.length(ModelRow.entry)
        self._list_models_stmt = (
            select(
                ModelRow.model_id,
                size.label("size"),
                case((size <= bindparam("inline"), ModelRow.entry), else_=None).label("entry"),
            )
            .where(ModelRow.model_id > bindparam("after"))
            .order_by(ModelRow.model_id)
            .limit(bindparam("limit"))
        )
        self._get_worker_stmt = select(WorkerRow.data).where(WorkerRow.worker_id == bindparam("worker_id"))
        database = self.engine.url.database or ""
        file_backed = self._sqlite and database not in ("", ":memory:")
        self._lookups = SqliteLookups(database) if file_backed else None
        postgres_psycopg = self._postgres and self.engine.dialect.driver == "psycopg"
        self._async_lookups = PostgresLookups(self.engine.url) if postgres_psycopg else None
        if auto_migrate:
            db.migrate(self.engine)

    def close(self) -> None:
        """Close the connection pool."""
        if self._async_lookups is not None:
            self._async_lookups.close()
        self.engine.dispose()

    def check(self) -> None:
        """Raise `Unavailable` unless the database answers (for health checks)."""
        with self._read() as conn:
            conn.execute(select(1)).scalar_one()

    # ------------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with db.database_errors(), self._read_engine.connect() as conn:
            yield conn

    def _write(self) -> contextlib.AbstractContextManager[Session]:
        """A session in one transaction; on SQLite it holds the write lock from the start."""
        return write_session(self.engine, db.database_errors())

    def _lock(self, statement: Any) -> Any:
        # SQLite's BEGIN IMMEDIATE already serializes writers.
        return statement.with_for_update() if self._postgres else statement

    # ------------------------------------------------------------------ models

    def create_model(self, model_id: str, model: model_pb2.Model, *, source_key: str = "") -> model_pb2.Model:
        """Store a new model `models/{model_id}`; sets name, times, etag and version (default 1).

        Raises InvalidArgument for a bad id or entry, AlreadyExists (reason
        MODEL_ALREADY_EXISTS) when the id is taken, FailedPrecondition (reason
        PARENT_NOT_FOUND) when `model.parent` is not in the catalog.
        """
        check_id(model_id, "model", "model_id")
        entry = model_pb2.Model()
        entry.CopyFrom(model)
        now = self.clock()
        entry.name = MODEL_PREFIX + model_id
        entry.create_time.FromDatetime(now)
        entry.update_time.FromDatetime(now)
        entry.etag = new_etag()
        if entry.version <= 0:
            entry.version = 1
        self._normalize(entry)
        columns = self._columns(entry)
        try:
            with self._write() as session:
                parent_pk = self._parent_pk(session, entry)
                row = ModelRow(
                    model_id=model_id,
                    parent_id=parent_pk,
                    source_key=source_column(source_key),
                    version=entry.version,
                    etag=entry.etag,
                    create_time=now,
                    update_time=now,
                    entry=entry.SerializeToString(),
                    **columns,
                )
                session.add(row)
                session.flush()
                self._replace_tags_labels(session, row.id, entry, new=True)
        except IntegrityError as error:
            if self._model_exists(model_id):
                raise AlreadyExists(
                    f"model {entry.name} already exists",
                    reason="MODEL_ALREADY_EXISTS",
                    metadata={"model": entry.name},
                ) from error
            # The parent was deleted between the lookup and the insert.
            raise self._parent_missing(entry.parent) from error
        return entry

    @property
    def local_reads(self) -> bool:
        """True when `get_model` reads a local file in microseconds (SQLite), never a network."""
        return self._lookups is not None

    @property
    def async_reads(self) -> bool:
        """True when `get_model_async` reads without a thread (PostgreSQL over psycopg)."""
        return self._async_lookups is not None

    async def get_model_async(self, model_id: str) -> model_pb2.Model:
        """`get_model` on the event loop (`async_reads` stores only): no thread hop."""
        assert self._async_lookups is not None, "async_reads is False"
        model_id = model_id_of(model_id)
        found = await self._async_lookups.one(_GET_MODEL_PG_SQL, (model_id,))
        if found is None:
            raise self._model_not_found(model_id)
        return model_pb2.Model.FromString(found[0])

    def get_model(self, model_id: str) -> model_pb2.Model:
        """The model `models/{model_id}` (`model_id` may carry the `models/` prefix)."""
        model_id = model_id_of(model_id)
        if self._lookups is not None:
            found = self._lookups.one(_GET_MODEL_SQL, (model_id,))
            entry = found[0] if found is not None else None
        else:
            with self._read() as conn:
                entry = conn.execute(self._get_model_stmt, {"model_id": model_id}).scalar()
        if entry is None:
            raise self._model_not_found(model_id)
        return model_pb2.Model.FromString(entry)

    def list_models(
        self, page_size: int = 0, page_token: str = "", filter: str = ""
    ) -> tuple[list[model_pb2.Model], str]:
        """One page of models ordered by id, and the token of the next page ('' at the end).

        `filter` (AIP-160 subset, terms joined by AND) accepts: name (prefix with a
        trailing `*`), kind, model_type (alias family), architecture, state,
        weight_format, base_model, parent (`parent = ""` for roots), tag,
        labels.KEY. Enum values are accepted short (`READY`) or full.
        """
        page = self._page_request(page_size, page_token, filter)
        rows: Sequence[tuple[Any, ...]]
        if not page.terms and self._lookups is not None:
            rows = self._lookups.all(_LIST_MODELS_SQL, page.params)
        else:
            conditions = [self._model_condition(term) for term in page.terms]
            statement = self._list_models_stmt.where(and_(true(), *conditions))
            inline, after, limit = page.params
            with self._read() as conn:
                rows = conn.execute(statement, {"inline": inline, "after": after, "limit": limit}).all()
        fitting, more = page.fit(rows)
        missing = [model_id for model_id, _size, entry in fitting if entry is None]
        return page.finish(fitting, more, self._entries_of(missing) if missing else {})

    async def list_models_async(
        self, page_size: int = 0, page_token: str = "", filter: str = ""
    ) -> tuple[list[model_pb2.Model], str]:
        """`list_models` on the event loop (`async_reads` stores): an unfiltered page is one
        query on psycopg's async connection; filtered pages run `list_models` in a thread."""
        page = self._page_request(page_size, page_token, filter)
        if page.terms or self._async_lookups is None:
            return await asyncio.to_thread(self.list_models, page_size, page_token, filter)
        rows = await self._async_lookups.all(_LIST_MODELS_PG_SQL, page.params)
        fitting, more = page.fit(rows)
        missing = [model_id for model_id, _size, entry in fitting if entry is None]
        large = await asyncio.to_thread(self._entries_of, missing) if missing else {}
        return page.finish(fitting, more, large)

    @staticmethod
    def _page_request(page_size: int, page_token: str, filter: str) -> _PageRequest:
        size = paging.page_size(page_size)
        terms = filtering.parse_filter(filter, MODEL_FILTER_FIELDS)
        query = "models?" + filtering.canonical(terms)
        last = paging.decode_page_token(page_token, query, kinds=(str,))
        return _PageRequest(size, terms, query, str(last[0]) if last is not None else "")

    def _entries_of(self, model_ids: Sequence[str]) -> dict[str, bytes]:
        """The stored entries of `model_ids` (the ones that exist), by id."""
        with self._read() as conn:
            rows = conn.execute(
                select(ModelRow.model_id, ModelRow.entry).where(ModelRow.model_id.in_(model_ids))
            ).all()
        return {model_id: entry for model_id, entry in rows}

    def update_model(self, model: model_pb2.Model, paths: Sequence[str]) -> model_pb2.Model:
        """Apply the fields of `model` named by `paths` to the stored `model.name`.

        Paths: display_name, description, author, license, tags, labels (or
        `labels.KEY` for one label), parent. No paths means every one of those
        fields that is set in `model`. When `model.etag` is set it must match
        the stored etag (Aborted, reason ETAG_MISMATCH). Every write sets a new etag.
        """
        model_id = model_id_of(model.name)
        paths = self._update_paths(model, paths)
        with self._write() as session:
            row = self._locked_model(session, model_id)
            self._check_etag(row, model.etag)
            entry = model_pb2.Model.FromString(row.entry)
            for path in paths:
                if path.startswith("labels."):
                    key = path.removeprefix("labels.")
                    if key in model.labels:
                        entry.labels[key] = model.labels[key]
                    else:
                        entry.labels.pop(key, None)
                elif path == "tags":
                    del entry.tags[:]
                    entry.tags.extend(model.tags)
                elif path == "labels":
                    entry.labels.clear()
                    entry.labels.update(model.labels)
                else:
                    setattr(entry, path, getattr(model, path))
            self._normalize(entry)
            parent_pk = self._parent_pk(session, entry)
            if "parent" in paths:
                self._check_no_cycle(session, row.id, parent_pk, entry)
            self._save_row(session, row, entry, parent_pk)
        return entry

    def save_model(self, model: model_pb2.Model, *, expected_etag: str | None = None) -> model_pb2.Model:
        """Replace the stored entry `model.name` with `model` (the import flow's writes).

        Name, create_time and version stay as stored; etag and update_time are
        new. `expected_etag`, when given, must match (Aborted, reason ETAG_MISMATCH).
        """
        model_id = model_id_of(model.name)
        entry = model_pb2.Model()
        entry.CopyFrom(model)
        self._normalize(entry)
        with self._write() as session:
            row = self._locked_model(session, model_id)
            if expected_etag is not None:
                self._check_etag(row, expected_etag, required=True)
            entry.name = MODEL_PREFIX + model_id
            entry.create_time.FromDatetime(row.create_time)
            entry.version = row.version
            parent_pk = self._parent_pk(session, entry)
            if parent_pk != row.parent_id:
                self._check_no_cycle(session, row.id, parent_pk, entry)
            self._save_row(session, row, entry, parent_pk)
        return entry

    def delete_model(self, model_id: str, *, force: bool = False, etag: str = "") -> list[str]:
        """Delete a model; with `force`, its descendants too (children first).

        Returns the names deleted, in the order they were deleted. Without
        `force`, a model with descendants is refused (FailedPrecondition, reason
        MODEL_HAS_DESCENDANTS, listing them). A set `etag` must match.
        """
        model_id = model_id_of(model_id)
        with self._write() as session:
            row = self._locked_model(session, model_id)
            self._check_etag(row, etag)
            levels = self._descendant_levels(session, row.id)
            descendants = [mid for level in levels for _pk, mid in level]
            if descendants and not force:
                names = [MODEL_PREFIX + mid for mid in descendants]
                raise FailedPrecondition(
                    f"models/{model_id} has {len(names)} descendant(s): {', '.join(names)}; "
                    "delete them first or pass force to delete them all",
                    reason="MODEL_HAS_DESCENDANTS",
                    metadata={"model": MODEL_PREFIX + model_id, "descendants": ",".join(names)},
                )
            deleted: list[str] = []
            for level in [*reversed(levels), [(row.id, model_id)]]:
                pks = [pk for pk, _mid in level]
                session.execute(delete(ModelTagRow).where(ModelTagRow.model_pk.in_(pks)))
                session.execute(delete(ModelLabelRow).where(ModelLabelRow.model_pk.in_(pks)))
                session.execute(delete(ModelRow).where(ModelRow.id.in_(pks)))
                deleted.extend(MODEL_PREFIX + mid for _pk, mid in level)
        return deleted

    def get_lineage(self, model_id: str) -> tuple[list[model_pb2.Model], list[model_pb2.Model]]:
        """(ancestors nearest first, descendants breadth first, by id within a level)."""
        model_id = model_id_of(model_id)
        with self._read() as conn:
            start = conn.execute(
                select(ModelRow.id, ModelRow.parent_id).where(ModelRow.model_id == model_id)
            ).first()
            if start is None:
                raise self._model_not_found(model_id)
            ancestors: list[model_pb2.Model] = []
            seen = {start.id}
            parent_pk = start.parent_id
            while parent_pk is not None and parent_pk not in seen:
                seen.add(parent_pk)
                row = conn.execute(
                    select(ModelRow.parent_id, ModelRow.entry).where(ModelRow.id == parent_pk)
                ).first()
                if row is None:
                    break
                ancestors.append(model_pb2.Model.FromString(row.entry))
                parent_pk = row.parent_id
            descendants: list[model_pb2.Model] = []
            level = [start.id]
            while level:
                rows = conn.execute(
                    select(ModelRow.id, ModelRow.entry)
                    .where(ModelRow.parent_id.in_(level))
                    .order_by(ModelRow.model_id)
                ).all()
                rows = [r for r in rows if r.id not in seen]
                seen.update(r.id for r in rows)
                descendants.extend(model_pb2.Model.FromString(r.entry) for r in rows)
                level = [r.id for r in rows]
        return ancestors, descendants

    def next_version(self, source_key: str) -> int:
        """The version the next import of `source_key` gets: 1 + the highest so far (1 if none)."""
        if not source_key:
            raise ValueError("source_key must not be empty")
        with self._read() as conn:
            highest = conn.execute(
                select(func.max(ModelRow.version)).where(ModelRow.source_key == source_column(source_key))
            ).scalar()
        return int(highest or 0) + 1

    def find_by_source(self, source_key: str) -> list[model_pb2.Model]:
        """Every model imported from `source_key`, oldest version first."""
        if not source_key:
            return []
        with self._read() as conn:
            entries = conn.execute(
                select(ModelRow.entry)
                .where(ModelRow.source_key == source_column(source_key))
                .order_by(ModelRow.version, ModelRow.model_id)
            ).scalars()
            return [model_pb2.Model.FromString(entry) for entry in entries]

    def find_by_local_path(self, local_path: str) -> model_pb2.Model | None:
        """The entry whose files are at `local_path` (READY first, then the newest version), or None."""
        if not local_path:
            return None
        found = self._find(ModelRow.local_path == local_path, limit=1)
        return found[0] if found else None

    def find_by_hub_repo(self, repo_id: str) -> list[model_pb2.Model]:
        """Entries imported from hub repository `repo_id` (any case), READY first, newest version first."""
        if not repo_id:
            return []
        return self._find(ModelRow.hub_repo == repo_id.lower())

    def _find(self, condition: ColumnElement[bool], limit: int | None = None) -> list[model_pb2.Model]:
        ready_first = case(
            (ModelRow.state == model_pb2.ModelState.Name(model_pb2.MODEL_STATE_READY), 0), else_=1
        )
        statement = (
            select(ModelRow.entry)
            .where(condition)
            .order_by(ready_first, ModelRow.version.desc(), ModelRow.model_id)
            .limit(limit)
        )
        with self._read() as conn:
            return [model_pb2.Model.FromString(entry) for entry in conn.execute(statement).scalars()]

    def fail_unfinished_imports(self, reason: str = "IMPORT_INTERRUPTED") -> list[str]:
        """Mark entries left IMPORTING/VALIDATING (by a crash) FAILED; returns their names."""
        names = [model_pb2.ModelState.Name(state) for state in UNFINISHED_STATES]
        failed: list[str] = []
        with self._write() as session:
            rows = session.scalars(
                self._lock(select(ModelRow).where(ModelRow.state.in_(names)).order_by(ModelRow.model_id))
            ).all()
            for row in rows:
                entry = model_pb2.Model.FromString(row.entry)
                entry.error.reason = reason
                entry.error.message = (
                    f"the catalog stopped while this model was "
                    f"{model_pb2.ModelState.Name(entry.state).removeprefix('MODEL_STATE_').lower()}; "
                    "import it again"
                )
                entry.state = model_pb2.MODEL_STATE_FAILED
                self._save_row(session, row, entry, row.parent_id)
                failed.append(entry.name)
        return failed

    # ------------------------------------------------------------------ model helpers

    def _normalize(self, entry: model_pb2.Model) -> None:
        """Canonical parent name, de-duplicated tags, kind agreeing with the config; limits."""
        check_enum(model_pb2.ModelKind, entry.kind, "model.kind")
        check_enum(model_pb2.ModelState, entry.state, "model.state")
        check_enum(model_pb2.WeightFormat, entry.llm.weight_format, "model.llm.weight_format")
        check_enum(model_pb2.WeightFormat, entry.image.weight_format, "model.image.weight_format")
        check_enum(model_pb2.ImageBaseModel, entry.image.base_model, "model.image.base_model")
        config = entry.WhichOneof("config")
        if config is not None:
            expected = CONFIG_KINDS[config]
            if entry.kind == model_pb2.MODEL_KIND_UNSPECIFIED:
                entry.kind = expected
            elif entry.kind != expected:
                raise InvalidArgument(
                    f"kind {model_pb2.ModelKind.Name(entry.kind)} does not agree with the {config} config",
                    reason="KIND_MISMATCH",
                    violations=[
                        FieldViolation("model.kind", f"must be {model_pb2.ModelKind.Name(expected)}")
                    ],
                )
        if entry.parent:
            parent_id = model_id_of(entry.parent)
            check_id(parent_id, "parent", "model.parent")
            entry.parent = MODEL_PREFIX + parent_id
        tags = list(dict.fromkeys(entry.tags))
        for tag in tags:
            if not tag or len(tag) > MAX_TAG_CHARS:
                raise InvalidArgument(
                    f"tag {tag[:40]!r} is invalid: tags are 1-{MAX_TAG_CHARS} characters",
                    reason="INVALID_TAG",
                    violations=[FieldViolation("model.tags", f"each tag has 1-{MAX_TAG_CHARS} characters")],
                )
        del entry.tags[:]
        entry.tags.extend(tags)
        for key, value in entry.labels.items():
            if not key or len(key) > MAX_LABEL_KEY_CHARS or len(value) > MAX_LABEL_VALUE_CHARS:
                raise InvalidArgument(
                    f"label {key[:40]!r} is invalid: keys have 1-{MAX_LABEL_KEY_CHARS} characters, "
                    f"values at most {MAX_LABEL_VALUE_CHARS}",
                    reason="INVALID_LABEL",
                    violations=[FieldViolation(f"model.labels.{key[:40]}", "key or value too long or empty")],
                )
        check_strings(entry, "model", MAX_MODEL_BYTES)

    @staticmethod
    def _columns(entry: model_pb2.Model) -> dict[str, Any]:
        """The indexed columns of an entry (everything except ids, lineage, versioning and data)."""
        architecture = model_type = base_model = ""
        weight_format = model_pb2.WEIGHT_FORMAT_UNSPECIFIED
        config = entry.WhichOneof("config")
        if config == "llm":
            architecture, model_type = entry.llm.architecture, entry.llm.model_type
            weight_format = entry.llm.weight_format
            base_model = entry.llm.adapter.base_model
        elif config == "image":
            architecture, weight_format = entry.image.pipeline_class, entry.image.weight_format
            if entry.image.base_model != model_pb2.IMAGE_BASE_MODEL_UNSPECIFIED:
                base_model = model_pb2.ImageBaseModel.Name(entry.image.base_model)
        elif config == "audio":
            architecture, model_type = entry.audio.architecture, entry.audio.model_type
        elif config == "video":
            architecture = entry.video.architecture
        if not base_model and entry.source.WhichOneof("source") == "fine_tune":
            base_model = entry.source.fine_tune.base_model
        for field, value in (
            ("architecture", architecture),
            ("model_type", model_type),
            ("base_model", base_model),
        ):
            check_bytes(field, value, MAX_INDEXED_BYTES)
        hub_repo = ""
        if entry.source.WhichOneof("source") == "hugging_face":
            hub_repo = entry.source.hugging_face.repo_id.lower()
        for field, value in (("local_path", entry.local_path), ("hub_repo", hub_repo)):
            check_bytes(field, value, MAX_INDEXED_BYTES)
        return {
            "local_path": entry.local_path,
            "hub_repo": hub_repo,
            "kind": model_pb2.ModelKind.Name(entry.kind),
            "model_type": model_type,
            "architecture": architecture,
            "state": model_pb2.ModelState.Name(entry.state),
            "weight_format": model_pb2.WeightFormat.Name(weight_format),
            "base_model": base_model,
        }

    def _save_row(
        self, session: Session, row: ModelRow, entry: model_pb2.Model, parent_pk: int | None
    ) -> None:
        """Write `entry` over `row` with a new etag and update time."""
        now = self.clock()
        entry.etag = new_etag()
        entry.update_time.FromDatetime(now)
        for column, value in self._columns(entry).items():
            setattr(row, column, value)
        row.parent_id = parent_pk
        row.etag = entry.etag
        row.update_time = now
        row.entry = entry.SerializeToString()
        session.flush()
        self._replace_tags_labels(session, row.id, entry)

    @staticmethod
    def _replace_tags_labels(session: Session, pk: int, entry: model_pb2.Model, *, new: bool = False) -> None:
        if not new:
            session.execute(delete(ModelTagRow).where(ModelTagRow.model_pk == pk))
            session.execute(delete(ModelLabelRow).where(ModelLabelRow.model_pk == pk))
        if entry.tags:
            session.execute(insert(ModelTagRow), [{"model_pk": pk, "tag": tag} for tag in entry.tags])
        if entry.labels:
            session.execute(
                insert(ModelLabelRow),
                [{"model_pk": pk, "key": k, "value": v} for k, v in sorted(entry.labels.items())],
            )

    def _parent_pk(self, session: Session, entry: model_pb2.Model) -> int | None:
        if not entry.parent:
            return None
        pk = session.scalar(select(ModelRow.id).where(ModelRow.model_id == model_id_of(entry.parent)))
        if pk is None:
            raise self._parent_missing(entry.parent)
        return pk

    @staticmethod
    def _parent_missing(parent: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"parent model {parent} is not in the catalog; import or create it first",
            reason="PARENT_NOT_FOUND",
            metadata={"parent": parent},
        )

    def _check_no_cycle(
        self, session: Session, pk: int, parent_pk: int | None, entry: model_pb2.Model
    ) -> None:
        """Refuse a parent that is the model itself or one of its descendants."""
        seen: set[int] = set()
        current = parent_pk
        while current is not None and current not in seen:
            if current == pk:
                raise InvalidArgument(
                    f"{entry.parent} descends from {entry.name}: a model cannot be its own ancestor",
                    reason="LINEAGE_CYCLE",
                    metadata={"model": entry.name, "parent": entry.parent},
                    violations=[
                        FieldViolation("model.parent", "must not be the model or one of its descendants")
                    ],
                )
            seen.add(current)
            current = session.scalar(select(ModelRow.parent_id).where(ModelRow.id == current))

    def _descendant_levels(self, session: Session, pk: int) -> list[list[tuple[int, str]]]:
        """Descendants of `pk` level by level: [(pk, model_id), ...] per generation."""
        levels: list[list[tuple[int, str]]] = []
        seen = {pk}
        level = [pk]
        while level:
            rows = session.execute(
                self._lock(
                    select(ModelRow.id, ModelRow.model_id)
                    .where(ModelRow.parent_id.in_(level))
                    .order_by(ModelRow.model_id)
                )
            ).all()
            found = [(r.id, r.model_id) for r in rows if r.id not in seen]
            seen.update(p for p, _ in found)
            if found:
                levels.append(found)
            level = [p for p, _ in found]
        return levels

    def _locked_model(self, session: Session, model_id: str) -> ModelRow:
        row = session.scalars(self._lock(select(ModelRow).where(ModelRow.model_id == model_id))).first()
        if row is None:
            raise self._model_not_found(model_id)
        return row

    @staticmethod
    def _check_etag(row: ModelRow, etag: str, *, required: bool = False) -> None:
        if (etag or required) and etag != row.etag:
            name = MODEL_PREFIX + row.model_id
            raise Aborted(
                f"{name} changed since it was read (etag {etag!r} is stale); read it again and retry",
                reason="ETAG_MISMATCH",
                metadata={"model": name, "etag": etag},
            )

    def _model_exists(self, model_id: str) -> bool:
        with self._read() as conn:
            return conn.execute(self._get_model_stmt, {"model_id": model_id}).first() is not None

    @staticmethod
    def _model_not_found(model_id: str) -> NotFound:
        name = MODEL_PREFIX + model_id
        return NotFound(f"model {name} not found", reason="MODEL_NOT_FOUND", metadata={"model": name})

    @staticmethod
    def _update_paths(model: model_pb2.Model, paths: Sequence[str]) -> list[str]:
        if not paths:
            # AIP-134: no mask means every updatable field the request sets.
            return [p for p in UPDATABLE_MODEL_PATHS if _is_set(model, p)]
        for path in paths:
            if path not in UPDATABLE_MODEL_PATHS and not (path.startswith("labels.") and len(path) > 7):
                raise InvalidArgument(
                    f"field {path!r} cannot be updated; updatable fields: {', '.join(UPDATABLE_MODEL_PATHS)}",
                    reason="INVALID_UPDATE_MASK",
                    metadata={"path": path},
                    violations=[FieldViolation("update_mask", f"{path} is not updatable")],
                )
        return list(dict.fromkeys(paths))

    def _model_condition(self, term: Term) -> ColumnElement[bool]:
        """The SQL condition (bound parameters only) for one filter term."""
        field = term.field
        if field == "name":
            value = term.value.removeprefix(MODEL_PREFIX)
            return negate(term, string_match(ModelRow.model_id, Term(field, term.op, value)))
        if field in ("model_type", "family"):
            return negate(term, string_match(ModelRow.model_type, term))
        if field == "architecture":
            return negate(term, string_match(ModelRow.architecture, term))
        if field == "kind":
            return negate(
                term, ModelRow.kind == enum_value(model_pb2.ModelKind, "MODEL_KIND_", field, term.value)
            )
        if field == "state":
            value = enum_value(model_pb2.ModelState, "MODEL_STATE_", field, term.value)
            return negate(term, ModelRow.state == value)
        if field == "weight_format":
            value = enum_value(model_pb2.WeightFormat, "WEIGHT_FORMAT_", field, term.value)
            return negate(term, ModelRow.weight_format == value)
        if field == "base_model":
            return negate(term, self._base_model_condition(term))
        if field == "parent":
            return self._parent_condition(term)
        if field in ("tag", "tags"):
            tag_match = string_match(ModelTagRow.tag, term)
            has_tag = exists().where(ModelTagRow.model_pk == ModelRow.id, tag_match)
            return negate(term, has_tag)
        if field.startswith("labels."):
            key = field.removeprefix("labels.")
            conditions = [ModelLabelRow.model_pk == ModelRow.id, ModelLabelRow.key == key]
            if not (term.op == filtering.HAS and term.value == "*"):
                conditions.append(string_match(ModelLabelRow.value, term))
            return negate(term, exists().where(*conditions))
        raise filter_error(f"unknown filter field {field!r}")  # pragma: no cover - parse_filter checks

    @staticmethod
    def _base_model_condition(term: Term) -> ColumnElement[bool]:
        if term.value.endswith("*") or term.value == "*":
            return string_match(ModelRow.base_model, term)
        candidates = {term.value}
        upper = term.value.upper()
        image_names = set(model_pb2.ImageBaseModel.keys())
        for name in (upper, "IMAGE_BASE_MODEL_" + upper):
            if name in image_names:
                candidates.add(name)
        if not term.value.startswith(MODEL_PREFIX):
            candidates.add(MODEL_PREFIX + term.value)
        return ModelRow.base_model.in_(sorted(candidates))

    @staticmethod
    def _parent_condition(term: Term) -> ColumnElement[bool]:
        if term.op == filtering.HAS and term.value == "*":
            return ModelRow.parent_id.is_not(None)
        if term.value == "":
            is_root = ModelRow.parent_id.is_(None)
            return not_(is_root) if term.op == filtering.NE else is_root
        parent = aliased(ModelRow)
        parent_pk = select(parent.id).where(parent.model_id == model_id_of(term.value)).scalar_subquery()
        if term.op == filtering.NE:
            return or_(ModelRow.parent_id.is_(None), ModelRow.parent_id != parent_pk)
        return ModelRow.parent_id == parent_pk

    # ------------------------------------------------------------------ counts

    def count_models(self) -> dict[tuple[str, str], int]:
        """Number of models per (kind, state) name, e.g. ("MODEL_KIND_LLM", "MODEL_STATE_READY")."""
        with self._read() as conn:
            rows = conn.execute(
                select(ModelRow.kind, ModelRow.state, func.count()).group_by(ModelRow.kind, ModelRow.state)
            ).all()
        return {(kind, state): int(count) for kind, state, count in rows}


def _is_set(model: model_pb2.Model, path: str) -> bool:
    value = getattr(model, path)
    return bool(len(value)) if path in ("tags", "labels") else bool(value)


__all__ = [
    "ID_PATTERN",
    "MODEL_FILTER_FIELDS",
    "UPDATABLE_MODEL_PATHS",
    "WORKER_FILTER_FIELDS",
    "CatalogStore",
    "model_id_of",
    "utc_now",
    "worker_id_of",
]
