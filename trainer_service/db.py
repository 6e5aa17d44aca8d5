"""The trainer's database: schema (SQLAlchemy 2.0 declarative) and migrations.

SQLite is the embedded default (`sqlite:///{data_dir}/trainer.db`), PostgreSQL
is for production and for several trainers sharing one queue. Engines come
from `server_kit.database.make_engine` (WAL, busy timeout, `BEGIN IMMEDIATE` for
write transactions on SQLite; psycopg 3 on PostgreSQL). The schema is created
and changed only by the Alembic migrations in `trainer_service/migrations`;
they keep their own version table (`trainer_alembic_version`) so the trainer
and the catalog can share one PostgreSQL database.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Boolean, Engine, Float, Integer, String, Text, UniqueConstraint
from sqlalchemy.engine import URL, Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from server_kit.database import (
    SQLITE_IMMEDIATE,
    Migrations,
    UtcDateTime,
    is_sqlite,
    make_engine,
    normalize_url,
)
from server_kit.database import database_errors as _database_errors

__all__ = [
    "SQLITE_IMMEDIATE",
    "Base",
    "JobRow",
    "MetricRow",
    "database_errors",
    "default_url",
    "head_revision",
    "is_sqlite",
    "make_engine",
    "migrate",
    "normalize_url",
]

PACKAGE_DIR = Path(__file__).resolve().parent
ALEMBIC_INI = PACKAGE_DIR / "alembic.ini"
MIGRATIONS_DIR = PACKAGE_DIR / "migrations"
VERSION_TABLE = "trainer_alembic_version"
# Any constant shared by all trainers (and distinct from the catalog's): serializes migrations on PostgreSQL.
_MIGRATION_LOCK_ID = 0x747261696E72


def default_url(data_dir: Path) -> str:
    """The embedded default database: SQLite at `{data_dir}/trainer.db`."""
    return f"sqlite:///{data_dir / 'trainer.db'}"


class Base(DeclarativeBase):
    """Declarative base of the trainer's tables."""


class JobRow(Base):
    """A training job: indexed columns for the queue and filters, plus the `TrainingJob` proto as JSON.

    `spec` holds what the job needs to run that the proto does not carry (the
    base model's local path, the dataset's resolved origin), as JSON.
    `worker_id` and `lease_expire_time` say which trainer runs the job and
    until when its claim holds without renewal; a finished job keeps the
    `worker_id` of the trainer that ran it.
    """

    __tablename__ = "training_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(63), unique=True)
    state: Mapped[str] = mapped_column(String(32), index=True)
    base_model: Mapped[str] = mapped_column(Text, index=True)
    method: Mapped[str] = mapped_column(String(16), index=True)
    output_model_id: Mapped[str] = mapped_column(String(63), index=True)
    worker_id: Mapped[str | None] = mapped_column(String(63), index=True)
    lease_expire_time: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)
    update_time: Mapped[datetime] = mapped_column(UtcDateTime)
    spec: Mapped[str] = mapped_column(Text)
    data: Mapped[str] = mapped_column(Text)


class MetricRow(Base):
    """One logged step of a job's metric history: its metrics by name as JSON in `data`.

    `kind` is `TRAIN` (a logged training step) or `EVAL` (an evaluation); a
    step is kept once per kind (a resumed job overwrites the steps it redoes).
    """

    __tablename__ = "training_metrics"
    __table_args__ = (
        UniqueConstraint("job_id", "step", "kind", name="uq_training_metrics_job_id_step_kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(63), index=True)
    step: Mapped[int] = mapped_column(Integer)
    kind: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[float] = mapped_column(Float)
    time: Mapped[datetime] = mapped_column(UtcDateTime)
    data: Mapped[str] = mapped_column(Text)


MIGRATIONS = Migrations("the trainer database", ALEMBIC_INI, MIGRATIONS_DIR, _MIGRATION_LOCK_ID)


def database_errors() -> contextlib.AbstractContextManager[None]:
    """Driver errors meaning "the database is unreachable or busy" -> `Unavailable`."""
    return _database_errors("the trainer database")


def alembic_config(url: str | URL, connection: Connection | None = None) -> Any:
    """The Alembic `Config` of the trainer, located from this package (not the CWD)."""
    return MIGRATIONS.config(url, connection)


def migrate(target: str | URL | Engine, revision: str = "head") -> None:
    """Upgrade the database at `target` (a URL or an engine) to `revision` (default: latest)."""
    MIGRATIONS.upgrade(target, revision)


def downgrade(target: str | URL | Engine, revision: str = "base") -> None:
    """Downgrade the database at `target` to `revision` (default: no tables)."""
    MIGRATIONS.downgrade(target, revision)


def head_revision() -> str | None:
    """The latest revision the migrations define."""
    return MIGRATIONS.head()
