"""Real gRPC servers of the services, run in-process on a thread of their own.

Tests then call them through the sync typed clients, as a user would, while
the server's event loop runs undisturbed. (End-to-end tests start real
processes instead: `tests.helpers.ServerProcess`.)
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

from server_kit.server import GrpcServer, ServiceApp


class ThreadedServer:
    """A `GrpcServer` for `app` on 127.0.0.1 (free port) in a background event loop."""

    def __init__(self, app: ServiceApp, *, grace_seconds: float = 1.0, **options: Any) -> None:
        """`options` go to `GrpcServer` (e.g. `metrics_listen="127.0.0.1:0"`)."""
        self.app = app
        self.server = GrpcServer(app, "127.0.0.1:0", grace_seconds=grace_seconds, **options)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self._thread.start()
        self.run(self.server.start(), timeout=300)

    @property
    def target(self) -> str:
        """`127.0.0.1:port`."""
        return self.server.target

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
