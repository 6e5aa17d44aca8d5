"""The trainer service's health follows its job database (issue 14, item 5, same shape).

The server's own entry (``""``) stays SERVING (the process works); the trainer service's
turns NOT_SERVING while the database does not answer and SERVING again when it does.
The check itself (`server_kit.database.watch_database`) is exercised here with an injected
failure; a real PostgreSQL outage under the catalog is `tests/reliability/test_database_outage.py`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from server_kit.errors import Unavailable
from tests.helpers import health_status
from tests.servers import ThreadedServer
from trainer_service.app import SERVICE_NAME, TrainerApp
from trainer_service.settings import TrainerSettings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _until(address: str, service: str, status: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health_status(address, service) == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"{service or 'server'} not {status} within {timeout} s")


def test_trainer_service_is_not_serving_while_its_database_does_not_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = TrainerApp(TrainerSettings(data_dir=tmp_path / "trainer", worker_id="trainer-db-health"))
    server = ThreadedServer(app)
    try:
        assert app.store is not None
        assert health_status(server.target, SERVICE_NAME) == SERVING

        def down() -> None:
            raise Unavailable(
                "the trainer database is unavailable; retry later", reason="DATABASE_UNAVAILABLE"
            )

        monkeypatch.setattr(app.store, "check", down)
        _until(server.target, SERVICE_NAME, NOT_SERVING)
        assert health_status(server.target) == SERVING
        monkeypatch.undo()
        _until(server.target, SERVICE_NAME, SERVING)
    finally:
        server.stop()
