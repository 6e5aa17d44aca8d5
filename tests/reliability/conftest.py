"""Fixtures of the fault and load tests: a tiny model, catalog databases on SQLite and PostgreSQL.

The services run as real processes (`python -m catalog_service`, ...) so that they can be
SIGKILLed; see `tests/reliability/faults.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg import postgres_database
from tests.reliability.stack import Stack
from tinymodels.llm import build_llm

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float32 Llama (random weights, ChatML template), built once per session."""
    return build_llm(tmp_path_factory.mktemp("reliability-models") / "tiny-llama", arch="llama")


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The catalog database of one test, kept across restarts: a SQLite file or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
        return
    with postgres_database("modelyard_fault") as url:
        yield url


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_llm: Path) -> Iterator[Stack]:
    """Catalog + vLLM inference processes with the tiny model loaded, shared by the serving tests.

    Starting vLLM costs tens of seconds on 2 cores, so the load test and the serving fault
    tests share one deployment; each fault test leaves it serving again.
    """
    # A low admission limit, so the load test meets RESOURCE_EXHAUSTED back-pressure.
    deployment = Stack(tmp_path_factory.mktemp("stack"), tiny_llm, max_concurrent_requests=4)
    try:
        yield deployment
    finally:
        deployment.close()
