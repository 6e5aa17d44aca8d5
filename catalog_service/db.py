"""The catalog's database: schema (SQLAlchemy 2.0 declarative), engines, migrations.

SQLite is the embedded default (`sqlite:///{data_dir}/catalog.db`, WAL, foreign
keys on, a busy timeout, write transactions that take the write lock up front);
PostgreSQL is for production (`postgresql+psycopg://...`, `postgresql://` is
accepted). The schema is created and changed only by the Alembic migrations in
`catalog_service/migrations`; `migrate(url)` runs them from the installed
package, whatever the working directory.

Driver errors that mean "the database cannot be reached or is busy"
(`OperationalError`) become `Unavailable` in `database_errors()`, the one place
that maps them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    create_engine,
    event,
    exc,
    text,
)
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool, StaticPool
from sqlalchemy.types import TypeDecorator

from server_kit.errors import Unavailable

PACKAGE_DIR = Path(__file__).resolve().parent
ALEMBIC_INI = PACKAGE_DIR / "alembic.ini"
MIGRATIONS_DIR = PACKAGE_DIR / "migrations"

SQLITE_BUSY_TIMEOUT_MS = 10_000
# Execution option on a Connection: begin its transaction with BEGIN IMMEDIATE on SQLite.
SQLITE_IMMEDIATE = "modelyard_sqlite_immediate"
# Any constant shared by all catalog replicas: serializes concurrent migrations on PostgreSQL.
_MIGRATION_LOCK_ID = 0x6D6F64656C79


def default_url(data_dir: Path) -> str:
    """The embedded default database: SQLite at `{data_dir}/catalog.db`."""
    return f"sqlite:///{data_dir / 'catalog.db'}"


def normalize_url(url: str | URL) -> URL:
    """`url` as a SQLAlchemy URL; `postgresql://` and `postgres://` use psycopg 3."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def is_sqlite(url: str | URL) -> bool:
    """Whether `url` names a SQLite database."""
    return normalize_url(url).get_backend_name() == "sqlite"


# --------------------------------------------------------------------------- schema


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


NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of the catalog's tables (constraint names fixed for migrations)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ModelRow(Base):
    """A model entry: indexed columns for filtering plus the full `Model` proto as JSON."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(String(63), unique=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    model_type: Mapped[str] = mapped_column(Text, index=True)
    architecture: Mapped[str] = mapped_column(Text, index=True)
    state: Mapped[str] = mapped_column(String(32), index=True)
    weight_format: Mapped[str] = mapped_column(String(32), index=True)
    base_model: Mapped[str] = mapped_column(Text, index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), index=True)
    source_key: Mapped[str] = mapped_column(Text, index=True)
    local_path: Mapped[str] = mapped_column(Text, index=True)
    hub_repo: Mapped[str] = mapped_column(Text, index=True)
    version: Mapped[int] = mapped_column(Integer)
    etag: Mapped[str] = mapped_column(String(64))
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)
    update_time: Mapped[datetime] = mapped_column(UtcDateTime)
    data: Mapped[str] = mapped_column(Text)


class ModelTagRow(Base):
    """One tag of a model."""

    __tablename__ = "model_tags"

    model_pk: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(Text, primary_key=True, index=True)


class ModelLabelRow(Base):
    """One label (key/value) of a model."""

    __tablename__ = "model_labels"
    __table_args__ = (Index("ix_model_labels_key_value", "key", "value"),)

    model_pk: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class WorkerRow(Base):
    """A registered worker: indexed columns plus the full `Worker` proto as JSON.

    `state` is the state the worker reported (HEALTHY or DRAINING); whether it is
    UNAVAILABLE is derived from `last_heartbeat_time` when it is read.
    """

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    worker_id: Mapped[str] = mapped_column(String(63), unique=True)
    role: Mapped[str] = mapped_column(String(32), index=True)
    engine: Mapped[str] = mapped_column(Text, index=True)
    address: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(32))
    last_heartbeat_time: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)
    data: Mapped[str] = mapped_column(Text)


# --------------------------------------------------------------------------- engines


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An engine for `url` with the catalog's connection settings.

    SQLite: the parent folder is created, WAL journal, `foreign_keys=ON`, a busy
    timeout, and transactions begun by SQLAlchemy (`BEGIN`, or `BEGIN IMMEDIATE`
    on connections with the `SQLITE_IMMEDIATE` execution option) so that a
    read-then-write transaction never fails with "database is locked" halfway.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_recycle", 1800)
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


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions on `engine` that keep loaded attributes after commit."""
    return sessionmaker(engine, expire_on_commit=False)


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """Turn "database unreachable / busy" driver errors into `Unavailable` (retryable)."""
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError) as error:
        raise Unavailable(
            "the catalog database is unavailable; retry later",
            reason="DATABASE_UNAVAILABLE",
            metadata={"error": type(error.orig).__name__ if error.orig is not None else type(error).__name__},
        ) from error


# --------------------------------------------------------------------------- migrations


def alembic_config(url: str | URL, connection: Connection | None = None) -> Any:
    """The Alembic `Config` of the catalog, located from this package (not the CWD)."""
    from alembic.config import Config

    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    rendered = normalize_url(url).render_as_string(hide_password=False)
    config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@contextlib.contextmanager
def _migration_connection(target: str | URL | Engine) -> Iterator[Connection]:
    """A connection to migrate through (a given engine is used as is, and kept)."""
    engine = target if isinstance(target, Engine) else make_engine(target, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            postgres = connection.dialect.name == "postgresql"
            if postgres:
                # One replica migrates at a time; the others wait, then find nothing to do.
                connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
                connection.commit()
            try:
                yield connection
            finally:
                if postgres:
                    connection.rollback()
                    connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _MIGRATION_LOCK_ID})
                    connection.commit()
    finally:
        if engine is not target:
            engine.dispose()


def migrate(target: str | URL | Engine, revision: str = "head") -> None:
    """Upgrade the database at `target` (a URL or an engine) to `revision` (default: latest)."""
    from alembic import command

    with database_errors(), _migration_connection(target) as connection:
        command.upgrade(alembic_config(connection.engine.url, connection), revision)


def downgrade(target: str | URL | Engine, revision: str = "base") -> None:
    """Downgrade the database at `target` to `revision` (default: no tables at all)."""
    from alembic import command

    with database_errors(), _migration_connection(target) as connection:
        command.downgrade(alembic_config(connection.engine.url, connection), revision)


def current_revision(target: str | URL | Engine) -> str | None:
    """The Alembic revision the database at `target` is at (None when unmigrated)."""
    from alembic.runtime.migration import MigrationContext

    with database_errors(), _migration_connection(target) as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    """The latest revision the migrations define."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
