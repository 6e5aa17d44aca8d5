"""Fixtures of the catalog tests: a store on SQLite and on PostgreSQL, and a fake clock.

Every test that takes `store` (or `db_url`) runs twice: on a SQLite file in the
test's tmp folder and on PostgreSQL (skipped with a message when no server is
reachable, a failure when CI=true; see tests/pg.py). PostgreSQL tests share one
database per session, migrated once and emptied before each test;
`empty_db_url` gives a brand-new database for the migration tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from catalog_service import db
from catalog_service.store import CatalogStore
from tests.pg import postgres_database, truncate_tables

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


class FakeClock:
    """A clock that moves only when told to (timezone-aware UTC)."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by `seconds`."""
        self.now += timedelta(seconds=seconds)


@pytest.fixture(scope="session")
def shared_postgres_url() -> Iterator[str]:
    """One migrated PostgreSQL database for the session's tests (dropped at the end)."""
    with postgres_database() as url:
        db.migrate(url)
        yield url


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty catalog database: a fresh SQLite file, or the emptied shared PostgreSQL one."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.db'}"
        db.migrate(url)
        yield url
        return
    url = request.getfixturevalue("shared_postgres_url")
    truncate_tables(url)
    yield url


@pytest.fixture(params=BACKENDS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no tables at all: a new SQLite file or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    with postgres_database() as url:
        yield url


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock the store under test reads."""
    return FakeClock()


@pytest.fixture
def store(db_url: str, clock: FakeClock) -> Iterator[CatalogStore]:
    """A `CatalogStore` on `db_url` with a 30 s heartbeat TTL and the fake clock."""
    catalog = CatalogStore(db_url, clock=clock, heartbeat_ttl=30, auto_migrate=False)
    try:
        yield catalog
    finally:
        catalog.close()


@pytest.fixture
def postgres_store(shared_postgres_url: str, clock: FakeClock) -> Iterator[CatalogStore]:
    """A `CatalogStore` on the emptied shared PostgreSQL database only (for what only
    PostgreSQL stores do)."""
    truncate_tables(shared_postgres_url)
    catalog = CatalogStore(shared_postgres_url, clock=clock, heartbeat_ttl=30, auto_migrate=False)
    try:
        yield catalog
    finally:
        catalog.close()
