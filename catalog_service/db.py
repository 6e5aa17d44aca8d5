"""The catalog's database: schema (SQLAlchemy 2.0 declarative), engines, migrations.

SQLite is the embedded default (`sqlite:///{data_dir}/catalog.db`, WAL, foreign
keys on, a busy timeout, write transactions that take the write lock up front);
PostgreSQL is for production (`postgresql+psycopg://...`, `postgresql://` is
accepted). The schema is created and changed only by the Alembic migrations in
`catalog_service/migrations`; `migrate(url)` runs them from the installed
package, whatever the working directory.

Engines, the mapping of driver errors to `Unavailable` and the migration runner
are shared with the trainer: `server_kit/database.py`.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.engine import URL, Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

# The shared engine helpers are re-exported: the store and the migrations use them as `db.X`.
from server_kit.database import (  # noqa: F401
    SQLITE_BUSY_TIMEOUT_MS,
    SQLITE_IMMEDIATE,
    Migrations,
    UtcDateTime,
    is_sqlite,
    make_engine,
    normalize_url,
)
from server_kit.database import database_errors as _database_errors

PACKAGE_DIR = Path(__file__).resolve().parent
ALEMBIC_INI = PACKAGE_DIR / "alembic.ini"
MIGRATIONS_DIR = PACKAGE_DIR / "migrations"

# Any constant shared by all catalog replicas: serializes concurrent migrations on PostgreSQL.
_MIGRATION_LOCK_ID = 0x6D6F64656C79


def default_url(data_dir: Path) -> str:
    """The embedded default database: SQLite at `{data_dir}/catalog.db`."""
    return f"sqlite:///{data_dir / 'catalog.db'}"


# --------------------------------------------------------------------------- schema


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
    """A model entry: indexed columns for filtering plus the full `Model` proto, serialized.

    `entry` holds the proto's binary form (`SerializeToString`): a read is a copy of
    bytes and a parse of ~1 µs, not a JSON parse (~200 µs for a typical LLM entry).
    Until migration 0003 the entry was JSON in a `data` column.
    """

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
    entry: Mapped[bytes] = mapped_column(LargeBinary)


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


class EngineOutcomeRow(Base):
    """What an engine did when a worker tried a model: the latest report per
    (model, engine, engine version, kind of device), key columns plus the full
    `EngineOutcome` proto as JSON. Rows go with their model (ON DELETE CASCADE).
    """

    __tablename__ = "engine_outcomes"

    model_pk: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    engine: Mapped[str] = mapped_column(String(256), primary_key=True)
    engine_version: Mapped[str] = mapped_column(String(256), primary_key=True)
    device_type: Mapped[str] = mapped_column(String(32), primary_key=True)
    supported: Mapped[bool] = mapped_column(Boolean)
    stage: Mapped[str] = mapped_column(String(32))
    worker: Mapped[str] = mapped_column(Text)
    model_etag: Mapped[str] = mapped_column(String(64))
    report_time: Mapped[datetime] = mapped_column(UtcDateTime)
    data: Mapped[str] = mapped_column(Text)


# --------------------------------------------------------------------------- engines


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions on `engine` that keep loaded attributes after commit."""
    return sessionmaker(engine, expire_on_commit=False)


MIGRATIONS = Migrations("the catalog database", ALEMBIC_INI, MIGRATIONS_DIR, _MIGRATION_LOCK_ID)


def database_errors() -> contextlib.AbstractContextManager[None]:
    """Driver errors meaning "the database is unreachable or busy" -> `Unavailable`."""
    return _database_errors("the catalog database")


def alembic_config(url: str | URL, connection: Connection | None = None) -> Any:
    """The Alembic `Config` of the catalog, located from this package (not the CWD)."""
    return MIGRATIONS.config(url, connection)


def migrate(target: str | URL | Engine, revision: str = "head") -> None:
    """Upgrade the database at `target` (a URL or an engine) to `revision` (default: latest)."""
    MIGRATIONS.upgrade(target, revision)


def downgrade(target: str | URL | Engine, revision: str = "base") -> None:
    """Downgrade the database at `target` to `revision` (default: no tables at all)."""
    MIGRATIONS.downgrade(target, revision)


def current_revision(target: str | URL | Engine) -> str | None:
    """The Alembic revision the database at `target` is at (None when unmigrated)."""
    return MIGRATIONS.current(target)


def head_revision() -> str | None:
    """The latest revision the migrations define."""
    return MIGRATIONS.head()
