"""The catalog warms its import flow up at start-up (`catalog_service.warmup`)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from catalog_service import app as app_module
from catalog_service.app import SERVICE_NAME, CatalogApp
from catalog_service.settings import CatalogSettings
from tests.helpers import ROOT, health_status
from tests.servers import ThreadedServer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

CHECK = """
import sys
from catalog_service.warmup import warm_up
lazy = ("transformers.configuration_utils", "transformers.models.auto.modeling_auto", "gguf")
assert not any(name in sys.modules for name in lazy), [n for n in lazy if n in sys.modules]
warm_up()
assert all(name in sys.modules for name in lazy), [n for n in lazy if n not in sys.modules]
"""


def test_warm_up_loads_what_the_first_import_would() -> None:
    """In a fresh interpreter: none of the lazy modules before, all of them after."""
    done = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_catalog_service_is_ready_once_the_import_flow_is_warm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's own entry serves at once; the catalog service's once warm_up returned."""
    release = threading.Event()

    def slow_warm_up() -> float:
        release.wait(30)
        return 0.0

    monkeypatch.setattr(app_module, "warm_up", slow_warm_up)
    app = CatalogApp(CatalogSettings(data_dir=tmp_path / "data", metrics_port=0))
    server = ThreadedServer(app)
    try:
        assert health_status(server.target) == SERVING
        assert health_status(server.target, SERVICE_NAME) == NOT_SERVING
        release.set()
        deadline = time.monotonic() + 30
        while health_status(server.target, SERVICE_NAME) != SERVING:
            assert time.monotonic() < deadline, "the catalog service never turned SERVING"
            time.sleep(0.05)
    finally:
        release.set()
        server.stop()
