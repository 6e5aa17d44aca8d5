"""A PostgreSQL that accepts TCP and never answers (issue 14, item 5).

A listener on 127.0.0.1 accepts connections and says nothing. The catalog must not hang
on it: start-up fails within the connect timeout with `DATABASE_UNAVAILABLE`, and
the engine's connection settings carry the timeouts.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server_kit.database import CONNECT_TIMEOUT_SECONDS, make_engine
from server_kit.errors import Unavailable
from tests.reliability.faults import serve


@pytest.fixture
def blackhole() -> Iterator[int]:
    """The port of a listener that accepts every connection and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        for connection in held:
            connection.close()
        listener.close()


def test_catalog_start_against_a_silent_database_fails_fast(tmp_path: Path, blackhole: int) -> None:
    url = f"postgresql://modelyard:secret@127.0.0.1:{blackhole}/modelyard"
    started = time.monotonic()
    catalog = serve(
        "catalog_service",
        ["--data-dir", str(tmp_path / "catalog")],
        {"MODELYARD_CATALOG_DATABASE_URL": url},
        log_path=tmp_path / "catalog.log",
    )
    try:
        code = catalog.proc.wait(CONNECT_TIMEOUT_SECONDS * 4 + 30)
    finally:
        catalog.stop()
    assert code == 1
    assert time.monotonic() - started < CONNECT_TIMEOUT_SECONDS * 4 + 30
    log = catalog.log()
    assert "DATABASE_UNAVAILABLE" in log
    assert "Traceback" not in log


def test_a_silent_database_gives_unavailable_within_the_connect_timeout(blackhole: int) -> None:
    from sqlalchemy import text

    from server_kit.database import database_errors

    engine = make_engine(f"postgresql://modelyard:secret@127.0.0.1:{blackhole}/modelyard")
    try:
        started = time.monotonic()
        with (
            pytest.raises(Unavailable) as down,
            database_errors("the catalog database"),
            engine.connect() as c,
        ):
            c.execute(text("SELECT 1"))
        assert down.value.reason == "DATABASE_UNAVAILABLE"
        assert time.monotonic() - started < CONNECT_TIMEOUT_SECONDS * 3
    finally:
        engine.dispose()


def test_postgres_connections_carry_the_timeouts() -> None:
    from server_kit.database import STATEMENT_TIMEOUT_MS, postgres_connect_args

    args = postgres_connect_args({"options": "-c search_path=x"}, STATEMENT_TIMEOUT_MS)
    assert args["connect_timeout"] == CONNECT_TIMEOUT_SECONDS
    assert args["options"] == f"-c search_path=x -c statement_timeout={STATEMENT_TIMEOUT_MS}"
    assert args["keepalives"] == 1 and args["tcp_user_timeout"] > 0
    assert "options" not in postgres_connect_args(None, 0)  # migrations: no statement timeout
    assert postgres_connect_args({"connect_timeout": 2}, 0)["connect_timeout"] == 2
