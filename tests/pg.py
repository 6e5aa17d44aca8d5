"""Throw-away PostgreSQL databases for tests.

`postgres_database()` creates `modelyard_test_<random>` on the first reachable
server and drops it afterwards. Where none is reachable, tests are skipped with
a message saying what was tried — unless `CI=true`, where that is a failure:
CI must run the PostgreSQL variants.

The servers tried: `$MODELYARD_TEST_POSTGRES_URL` when set, else
`postgresql+psycopg://postgres@127.0.0.1:5432/postgres`, then the same as
`root` (trust authentication).
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy.engine import URL, make_url

if TYPE_CHECKING:
    import psycopg

DEFAULT_ADMIN_URLS = (
    "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
    "postgresql+psycopg://root@127.0.0.1:5432/postgres",
)


def _candidates() -> list[str]:
    configured = os.environ.get("MODELYARD_TEST_POSTGRES_URL")
    return [configured] if configured else list(DEFAULT_ADMIN_URLS)


def _connect(url: URL) -> psycopg.Connection[Any]:
    import psycopg

    return psycopg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        dbname=url.database or "postgres",
        connect_timeout=3,
        autocommit=True,
    )


@functools.cache
def admin_url() -> tuple[URL | None, str]:
    """The first reachable server's admin URL, or None and why none was usable."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None, "psycopg is not installed (pip install 'modelyard[postgres]')"
    errors = []
    for candidate in _candidates():
        url = make_url(candidate)
        try:
            with _connect(url):
                return url, ""
        except Exception as error:  # any failure means "not usable here"
            errors.append(f"{url.render_as_string(hide_password=True)}: {str(error).strip()[:200]}")
    return None, "; ".join(errors)


def require_postgres() -> URL:
    """The admin URL; skips the test (fails it when CI=true) without a server."""
    url, why = admin_url()
    if url is None:
        message = f"PostgreSQL is not reachable ({why}); set MODELYARD_TEST_POSTGRES_URL to run these tests"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true requires PostgreSQL tests to run: {message}")
        pytest.skip(message)
    return url


@contextlib.contextmanager
def postgres_database(prefix: str = "modelyard_test") -> Iterator[str]:
    """Create a fresh database, yield its SQLAlchemy URL, drop it afterwards."""
    from psycopg import sql

    admin = require_postgres()
    name = f"{prefix}_{secrets.token_hex(6)}"
    # template0 takes no connections, so creation never collides with another session.
    with _connect(admin) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    try:
        yield admin.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)
    finally:
        with _connect(admin) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def truncate_tables(url: str, keep: tuple[str, ...] = ("alembic_version",)) -> None:
    """Empty every table of the `public` schema of `url` except `keep` (ids restart at 1).

    Much cheaper than a fresh database per test: create one per session with
    `postgres_database()`, migrate it once, and truncate between tests.
    """
    from psycopg import sql

    with _connect(make_url(url)) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
        tables = [row[0] for row in rows if row[0] not in keep]
        if tables:
            conn.execute(
                sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(
                    sql.SQL(", ").join(sql.Identifier(table) for table in tables)
                )
            )
