"""Fixtures of the security tests: a CA made on the spot, tokens, and real servers built by `make_server`.

The servers are the ones a deployment runs: `server_kit.common.make_server`
builds them from the settings (TLS credentials, tokens, audit log), and they
run in-process on a loop thread of their own (as `tests.servers.ThreadedServer`
does for plain servers); the tests call them through the typed clients, raw
stubs and grpcurl.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from server_kit.common import CommonSettings, make_server
from server_kit.server import GrpcServer, ServiceApp
from tests.security.certs import Pki, make_pki
from tinymodels.gguf_file import build_gguf

ADMIN_TOKEN = "admin-token-0123456789abcdef"
READER_TOKEN = "reader-token-0123456789abcdef"
WORKER_TOKEN = "worker-token-0123456789abcdef"
TOKENS = f"ops:admin:{ADMIN_TOKEN},dashboard:reader:{READER_TOKEN},gpu-node-1:worker:{WORKER_TOKEN}"
"""`MODELYARD_TOKENS` of the auth tests: one caller per role."""

ALL_TOKENS = (ADMIN_TOKEN, READER_TOKEN, WORKER_TOKEN)

StartCatalog = Callable[..., "SecureServer"]
"""`start_catalog(**security_settings)`: start a catalog with these CommonSettings fields."""


class SecureServer:
    """A server built by `make_server(app, "127.0.0.1:0", settings)`, run on a loop thread."""

    def __init__(self, app: ServiceApp, settings: CommonSettings) -> None:
        self.settings = settings
        self.server: GrpcServer = make_server(app, "127.0.0.1:0", settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="secure-server", daemon=True)
        self._thread.start()
        self.run(self.server.start(), timeout=300)

    @property
    def target(self) -> str:
        """`127.0.0.1:port` (the test server certificate names 127.0.0.1 and localhost)."""
        return self.server.target

    @property
    def port(self) -> int:
        """The bound port."""
        return self.server.port

    def run(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        """Stop the server and its loop."""
        try:
            self.run(self.server.stop(grace=0.5), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def audit_lines(path: Path) -> list[dict[str, Any]]:
    """The audit log's entries, parsed (each line must be one JSON object)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and a foreign CA."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The allowed import root, with one tiny GGUF model (imports take milliseconds)."""
    root = tmp_path_factory.mktemp("models")
    build_gguf(root / "tiny.Q8_0.gguf", tensor_type="q8_0")
    return root


def catalog_settings(root: Path, models_root: Path, **security: Any) -> CatalogSettings:
    """Catalog settings on SQLite under `root`, importing from `models_root`, plus `security`."""
    return CatalogSettings(
        data_dir=root / "catalog",
        allowed_roots=[models_root],
        hf_cache_dir=root / "hf-cache",
        heartbeat_ttl_seconds=30,
        drain_seconds=0,
        **security,
    )


@pytest.fixture
def start_catalog(tmp_path: Path, models_root: Path) -> Iterator[StartCatalog]:
    """`start_catalog(**security_settings)` → a running `SecureServer` with a catalog; stopped after."""
    started: list[SecureServer] = []

    def start(**security: Any) -> SecureServer:
        settings = catalog_settings(tmp_path / f"c{len(started)}", models_root, **security)
        server = SecureServer(CatalogApp(settings), settings)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
