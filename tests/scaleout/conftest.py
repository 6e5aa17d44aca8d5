"""Fixtures of the scale-out tests: real service processes sharing one PostgreSQL database.

Every server here is a real `python -m <service>` process
(`tests.helpers.ServerProcess`) logging to a file under the session's
temporary folder; a failing test shows the end of each log. The models and
datasets are built on the spot (a tiny Llama, a JSONL file); nothing is
downloaded.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.helpers import ServerProcess

T = TypeVar("T")

BASE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MODELYARD_DRAIN_SECONDS": "0",
    # Several servers of one kind run on this host: no fixed metrics ports.
    "MODELYARD_CATALOG_METRICS_PORT": "0",
    "MODELYARD_TRAINER_METRICS_PORT": "0",
    "MODELYARD_INFERENCE_METRICS_PORT": "0",
}


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder every scale-out test writes under (the catalogs may import from it)."""
    return tmp_path_factory.mktemp("scaleout")


@pytest.fixture(scope="session")
def tiny_llama(workdir: Path) -> Path:
    """A tiny random float32 Llama with a ChatML tokenizer."""
    from tinymodels.llm import build_llm

    return build_llm(workdir / "models" / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def chat_data(workdir: Path) -> Path:
    """16 distinct chat rows as JSONL (distinct, so DDP ranks see different data)."""
    path = workdir / "data" / "chat.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} times {i + 3}?"},
                {"role": "assistant", "content": f"{i} times {i + 3} is {i * (i + 3)}."},
            ]
        }
        for i in range(16)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `predicate` until it returns something truthy (returned); TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        time.sleep(interval)


class Fleet:
    """Starts service processes, each logging to its own file; stops them all at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.servers: dict[str, ServerProcess] = {}

    def start(self, module: str, name: str, env: Mapping[str, str]) -> ServerProcess:
        """Start `python -m module` as `name` (its data folder `folder/name`); not yet waited for."""
        data_dir = self.folder / name
        data_dir.mkdir(parents=True, exist_ok=True)
        full_env = {**BASE_ENV, "MODELYARD_DATA_DIR": str(data_dir), **env}
        server = ServerProcess(module, env=full_env, log_path=self.folder / f"{name}.log")
        self.servers[name] = server
        return server

    def logs(self) -> str:
        """The end of every server's log, for failure messages."""
        return "\n".join(f"---- {name}\n{server.log()[-1500:]}" for name, server in self.servers.items())

    def stop(self) -> None:
        """Stop every server still running, last started first (workers before their catalog).

        Each gets SIGTERM, then SIGKILL after 20 s.
        """
        for server in reversed(self.servers.values()):
            with contextlib.suppress(Exception):
                server.stop(timeout=20)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """Service processes for one test, stopped at its end."""
    servers = Fleet(tmp_path)
    yield servers
    servers.stop()


@pytest.fixture
def pg_fleet(tmp_path: Path) -> Iterator[tuple[Fleet, str]]:
    """Service processes for one test and a new PostgreSQL database for them (dropped after they stop)."""
    from tests.pg import postgres_database

    with postgres_database("modelyard_scaleout") as url:
        servers = Fleet(tmp_path)
        try:
            yield servers, url
        finally:
            servers.stop()


def read_json(path: Path) -> Any:
    """JSON from a file."""
    return json.loads(path.read_text(encoding="utf-8"))
