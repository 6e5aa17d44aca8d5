"""The trainer's database: schema (SQLAlchemy 2.0 declarative) and migrations.

SQLite is the embedded default (`sqlite:///{data_dir}/trainer.db`), PostgreSQL
is for production and for several trainers sharing one queue. Engines come
from the catalog's `make_engine` (WAL, busy timeout, `BEGIN IMMEDIATE` for
write transactions on SQLite; psycopg 3 on PostgreSQL). The schema is created
and changed only by the Alembic migrations in `trainer_service/migrations`;
they keep their own version table (`trainer_alembic_version`) so the trainer
and the catalog can share one PostgreSQL database.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Boolean, Engine, Integer, String, Text, exc, text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool

from catalog_service.db import SQLITE_IMMEDIATE, UtcDateTime, is_sqlite, make_engine, normalize_url
from server_kit.errors import Unavailable

__all__ = [
    "SQLITE_IMMEDIATE",
    "Base",
    "JobRow",
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


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """Turn "database unreachable / busy" driver errors into `Unavailable` (retryable)."""
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError) as error:
        raise Unavailable(
            "the trainer database is unavailable; retry later",
            reason="DATABASE_UNAVAILABLE",
            metadata={"error": type(error.orig).__name__ if error.orig is not None else type(error).__name__},
        ) from error


def alembic_config(url: str | URL, connection: Connection | None = None) -> Any:
    """The Alembic `Config` of the trainer, located from this package (not the CWD)."""
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
    engine = target if isinstance(target, Engine) else make_engine(target, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            postgres = connection.dialect.name == "postgresql"
            if postgres:
                # One trainer migrates at a time; the others wait, then find nothing to do.
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
    """Downgrade the database at `target` to `revision` (default: no tables)."""
    from alembic import command

    with database_errors(), _migration_connection(target) as connection:
        command.downgrade(alembic_config(connection.engine.url, connection), revision)


def head_revision() -> str | None:
    """The latest revision the migrations define."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
