"""Plain database connections for the catalog's hottest read, GetModel (and unfiltered pages).

SQLAlchemy's connection handling and result rows cost ~100 µs of CPU per query, more
than the indexed lookup itself; and on PostgreSQL a thread hop per call (16 callers
sharing the default executor's threads and the GIL with the event loop) cost ~3x the
query. So, beside the store's SQLAlchemy engine:

- `SqliteLookups`: one `sqlite3` connection per thread; the catalog runs GetModel on
  the event loop with it (a lookup takes ~10 µs even at a million entries).
- `PostgresLookups`: one psycopg `AsyncConnection` (autocommit, statements prepared
  by psycopg after a few uses) on the server's event loop: GetModel and unfiltered
  ListModels pages await the query instead of hopping to a thread. Concurrent calls
  queue on that connection (a round trip is ~100 µs on a local server, far below a
  gRPC call's own cost). Results come in PostgreSQL's binary format: `bytea` in text
  format is hex, and decoding it doubled the CPU of a page of 100 entries (729 vs
  374 µs).

Both raise `Unavailable` (reason DATABASE_UNAVAILABLE) when the database cannot be
read, like the store's other reads. Only the store uses them.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from typing import Any

from sqlalchemy.engine import URL

from server_kit.database import SQLITE_BUSY_TIMEOUT_MS, STATEMENT_TIMEOUT_MS, postgres_connect_args
from server_kit.errors import Unavailable


def _unavailable(error: Exception) -> Unavailable:
    return Unavailable(f"the catalog database cannot be read: {error}", reason="DATABASE_UNAVAILABLE")


class SqliteLookups:
    """Plain sqlite3 connections (one per thread)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            self._local.conn = conn
        return conn

    def one(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The first row of `sql`, or None."""
        try:
            row: tuple[Any, ...] | None = self._conn().execute(sql, params).fetchone()
        except sqlite3.Error as error:
            raise _unavailable(error) from error
        return row

    def all(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Every row of `sql`."""
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as error:
            raise _unavailable(error) from error


class PostgresLookups:
    """One psycopg `AsyncConnection` per event loop (made on first use, remade after an error)."""

    def __init__(self, url: URL, connect_args: dict[str, Any] | None = None) -> None:
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._args = postgres_connect_args(connect_args, STATEMENT_TIMEOUT_MS)
        self._conn: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connection(self) -> Any:
        import psycopg

        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self.close()
            self._loop, self._connecting = loop, asyncio.Lock()
        assert self._connecting is not None
        async with self._connecting:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, **self._args
                )
        return self._conn

    async def one(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The first row of `sql` (`%s` placeholders), or None."""
        import psycopg

        try:
            conn = await self._connection()
            cursor = await conn.execute(sql, params, binary=True)
            row: tuple[Any, ...] | None = await cursor.fetchone()
        except psycopg.Error as error:
            if isinstance(error, psycopg.OperationalError | psycopg.InterfaceError):
                self.close()  # the next call connects again
            raise _unavailable(error) from error
        return row

    async def all(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Every row of `sql` (`%s` placeholders)."""
        import psycopg

        try:
            conn = await self._connection()
            cursor = await conn.execute(sql, params, binary=True)
            rows: list[tuple[Any, ...]] = await cursor.fetchall()
        except psycopg.Error as error:
            if isinstance(error, psycopg.OperationalError | psycopg.InterfaceError):
                self.close()
            raise _unavailable(error) from error
        return rows

    def close(self) -> None:
        """Drop the connection (closes its socket; safe from any thread)."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            conn.pgconn.finish()


__all__ = ["PostgresLookups", "SqliteLookups"]
