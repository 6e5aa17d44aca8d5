"""Database plumbing shared by the services' stores: engines, errors, migrations.

SQLite is the embedded default (WAL, foreign keys on, a busy timeout, write
transactions that take the write lock up front); PostgreSQL is for production
(`postgresql+psycopg://...`; `postgresql://` is accepted). Each service keeps its
schema and its Alembic migrations in its own package and describes them with a
`Migrations`, which runs them from the installed package (whatever the working
directory), one replica at a time on PostgreSQL (an advisory lock).

PostgreSQL connections have timeouts (`CONNECT_TIMEOUT_SECONDS` for the whole start-up
handshake, `STATEMENT_TIMEOUT_MS` per statement, TCP keepalives and
`TCP_USER_TIMEOUT_MS` for a peer that vanishes), so a database that accepts TCP and
never answers fails calls with `Unavailable` instead of hanging them.

Driver errors that mean "the database cannot be reached or is busy"
(`OperationalError`, `InterfaceError`) become `Unavailable` in
`database_errors()`, the one place that maps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Dialect, Engine, MetaData, create_engine, event, exc, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool, StaticPool
from sqlalchemy.types import TypeDecorator

from server_kit.errors import Unavailable

log = logging.getLogger("modelyard.database")

SQLITE_BUSY_TIMEOUT_MS = 10_000
DATABASE_CHECK_SECONDS = 2.0
"""How often a service asks its database whether it answers (`watch_database`)."""
CONNECT_TIMEOUT_SECONDS = 5
"""Longest a PostgreSQL connection may take to be established (libpq ``connect_timeout``)."""
STATEMENT_TIMEOUT_MS = 30_000
"""Longest one statement may run on PostgreSQL (``statement_timeout``; 0 for migrations,
which may wait on another replica's advisory lock)."""
TCP_USER_TIMEOUT_MS = 30_000
"""Longest sent data may stay unacknowledged before the connection is dropped (Linux)."""
# Execution option on a Connection: begin its transaction with BEGIN IMMEDIATE on SQLite.
SQLITE_IMMEDIATE = "modelyard_sqlite_immediate"


def normalize_url(url: str | URL) -> URL:
    """`url` as a SQLAlchemy URL; `postgresql://` and `postgres://` use psycopg 3."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def is_sqlite(url: str | URL) -> bool:
    """Whether `url` names a SQLite database."""
    return normalize_url(url).get_backend_name() == "sqlite"


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    PostgreSQL stores `timestamptz`; SQLite stores naive UTC text, which sorts and
    compares correctly because every value is written in UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def postgres_connect_args(given: dict[str, Any] | None, statement_timeout_ms: int) -> dict[str, Any]:
    """libpq connection parameters with Modelyard's timeouts (those in ``given`` win)."""
    args = dict(given or {})
    args.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
    args.setdefault("keepalives", 1)
    args.setdefault("keepalives_idle", 10)
    args.setdefault("keepalives_interval", 5)
    args.setdefault("keepalives_count", 3)
    args.setdefault("tcp_user_timeout", TCP_USER_TIMEOUT_MS)
    if statement_timeout_ms:
        options = args.get("options", "")
        args["options"] = f"{options} -c statement_timeout={statement_timeout_ms}".strip()
    return args


def make_engine(url: str | URL, *, statement_timeout_ms: int = STATEMENT_TIMEOUT_MS, **kwargs: Any) -> Engine:
    """An engine for `url` with Modelyard's connection settings.

    PostgreSQL: the timeouts of `postgres_connect_args` (connect, statement, keepalives).

    SQLite: the parent folder is created, WAL journal, `foreign_keys=ON`, a busy
    timeout, and transactions begun by SQLAlchemy (`BEGIN`, or `BEGIN IMMEDIATE`
    on connections with the `SQLITE_IMMEDIATE` execution option) so that a
    read-then-write transaction never fails with "database is locked" halfway.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_recycle", 1800)
        if parsed.get_backend_name() == "postgresql":
            kwargs["connect_args"] = postgres_connect_args(kwargs.get("connect_args"), statement_timeout_ms)
        return create_engine(parsed, **kwargs)

    database = parsed.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    connect_args = kwargs.pop("connect_args", {})
    connect_args.setdefault("check_same_thread", False)
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
    if in_memory:
        kwargs.setdefault("poolclass", StaticPool)
    else:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # sqlite3 must not issue its own BEGINs: SQLAlchemy does (see `_on_begin`).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            return  # single-statement reads: sqlite3 runs each in its own implicit transaction
        immediate = conn.get_execution_options().get(SQLITE_IMMEDIATE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


@contextlib.contextmanager
def write_session(
    engine: Engine, errors: contextlib.AbstractContextManager[None], *, expire_on_commit: bool = False
) -> Iterator[Session]:
    """A session on `engine` in one transaction, its driver errors turned by `errors` (a
    service's `database_errors()`); on SQLite the transaction holds the write lock from the
    start (BEGIN IMMEDIATE), so concurrent writers queue instead of failing to upgrade."""
    with errors, engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.execution_options(**{SQLITE_IMMEDIATE: True})
        with Session(bind=conn, expire_on_commit=expire_on_commit) as session, session.begin():
            yield session


@contextlib.contextmanager
def database_errors(what: str = "the database") -> Iterator[None]:
    """Turn "database unreachable / busy" driver errors into `Unavailable` (retryable)."""
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError) as error:
        raise Unavailable(
            f"{what} is unavailable; retry later",
            reason="DATABASE_UNAVAILABLE",
            metadata={"error": type(error.orig).__name__ if error.orig is not None else type(error).__name__},
        ) from error


async def watch_database(
    check: Callable[[], None],
    report: Callable[[bool], Awaitable[None]],
    *,
    what: str = "the database",
    interval: float = DATABASE_CHECK_SECONDS,
) -> None:
    """Run ``check`` (blocking; raises when the database does not answer) on a thread every
    ``interval`` s and ``report(answers)`` on each change, until cancelled.  The services
    report their own health entry NOT_SERVING while their store does not answer."""
    answered = True
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(check)
            answers, problem = True, ""
        except Exception as exc:  # Unavailable (DATABASE_UNAVAILABLE), or anything else
            answers, problem = False, str(exc)
        if answers == answered:
            continue
        answered = answers
        if answers:
            log.info("%s answers again", what)
        else:
            log.warning("%s does not answer: %s", what, problem)
        await report(answers)


@dataclass(frozen=True)
class Migrations:
    """One service's Alembic migrations, run from its installed package."""

    #: What the database is called in errors, e.g. "the catalog database".
    what: str
    alembic_ini: Path
    migrations_dir: Path
    #: Advisory lock id (PostgreSQL) that serializes the service's replicas migrating.
    lock_id: int

    def config(self, url: str | URL, connection: Connection | None = None) -> Any:
        """The Alembic `Config`, located from the package (not the CWD)."""
        from alembic.config import Config

        config = Config(str(self.alembic_ini))
        config.set_main_option("script_location", str(self.migrations_dir))
        rendered = normalize_url(url).render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
        if connection is not None:
            config.attributes["connection"] = connection
        return config

    @contextlib.contextmanager
    def _connection(self, target: str | URL | Engine) -> Iterator[Connection]:
        """A connection to migrate through (a given engine is used as is, and kept)."""
        engine = (
            target
            if isinstance(target, Engine)
            else make_engine(target, poolclass=NullPool, statement_timeout_ms=0)
        )
        try:
            with engine.connect() as connection:
                postgres = connection.dialect.name == "postgresql"
                if postgres:
                    # One replica migrates at a time; the others wait, then find nothing to do.
                    connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": self.lock_id})
                    connection.commit()
                try:
                    yield connection
                finally:
                    if postgres:
                        connection.rollback()
                        connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": self.lock_id})
                        connection.commit()
        finally:
            if engine is not target:
                engine.dispose()

    def upgrade(self, target: str | URL | Engine, revision: str = "head") -> None:
        """Upgrade the database at `target` (a URL or an engine) to `revision`."""
        from alembic import command

        with database_errors(self.what), self._connection(target) as connection:
            command.upgrade(self.config(connection.engine.url, connection), revision)

    def downgrade(self, target: str | URL | Engine, revision: str = "base") -> None:
        """Downgrade the database at `target` to `revision` (default: no tables)."""
        from alembic import command

        with database_errors(self.what), self._connection(target) as connection:
            command.downgrade(self.config(connection.engine.url, connection), revision)

    def current(self, target: str | URL | Engine) -> str | None:
        """The revision the database at `target` is at (None when unmigrated)."""
        from alembic.runtime.migration import MigrationContext

        with database_errors(self.what), self._connection(target) as connection:
            version_table = self.config(connection.engine.url).get_main_option("version_table")
            options = {"version_table": version_table} if version_table else {}
            return MigrationContext.configure(connection, opts=options).get_current_revision()

    def head(self) -> str | None:
        """The latest revision the migrations define."""
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(self.config("sqlite://")).get_current_head()


def run_alembic_env(metadata: MetaData, url_env: str, version_table: str = "alembic_version") -> None:
    """The body of a service's `migrations/env.py`.

    `Migrations.upgrade()` hands a connection in `config.attributes`; the
    `alembic` command line gives a URL with `-x url=...`, the `url_env`
    variable or `sqlalchemy.url` in alembic.ini. SQLite runs in batch mode so
    ALTERs work there too. Autogenerate looks only at this service's tables and
    each service keeps its own version table, so services can share a database.
    """
    from alembic import context

    config = context.config

    def url() -> str:
        found = (
            context.get_x_argument(as_dictionary=True).get("url")
            or os.environ.get(url_env)
            or config.get_main_option("sqlalchemy.url")
        )
        if not found:
            raise SystemExit(f"no database URL: pass -x url=... or set {url_env}")
        return normalize_url(found).render_as_string(hide_password=False)

    def own_tables(name: str | None, type_: str, parent_names: Any) -> bool:
        return type_ != "table" or name in metadata.tables

    def run(connection: Connection) -> None:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
            version_table=version_table,
            include_name=own_tables,
        )
        with context.begin_transaction():
            context.run_migrations()

    if context.is_offline_mode():  # `alembic upgrade head --sql`: emit SQL to stdout
        context.configure(
            url=url(),
            target_metadata=metadata,
            literal_binds=True,
            dialect_opts={"paramstyle": "named"},
            version_table=version_table,
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    engine = make_engine(url(), poolclass=NullPool, statement_timeout_ms=0)
    try:
        with engine.connect() as conn:
            run(conn)
            conn.commit()
    finally:
        engine.dispose()
