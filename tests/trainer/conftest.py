"""Fixtures of the trainer tests: a tiny Llama, small datasets, a real catalog, job managers.

Everything is built on the spot (no downloads): the model with
`tinymodels.llm.build_llm`, the datasets as JSONL written here, and the
catalog is the real `CatalogApp` served on a free port in the test's event
loop, with the tiny model imported as `models/tiny-llama`.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from clients.catalog import AsyncCatalogClient
from server_kit.server import GrpcServer
from trainer_service.db import migrate
from trainer_service.jobs import JobStore
from trainer_service.manager import JobManager, ManagerConfig

BASE_MODEL = "models/tiny-llama"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Write `rows` as JSON Lines (a str row is written as is: a broken line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chat_rows(n: int = 8) -> list[dict[str, Any]]:
    """Small arithmetic conversations."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"The answer is {2 * i}."},
            ]
        }
        for i in range(n)
    ]


def preference_rows(n: int = 8) -> list[dict[str, Any]]:
    """Small preference pairs."""
    return [
        {"prompt": f"Is {i} even? ", "chosen": "yes it is.", "rejected": f"no, {i} is odd."} for i in range(n)
    ]


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for everything the trainer tests write (the catalog may import from it)."""
    return tmp_path_factory.mktemp("trainer")


@pytest.fixture(scope="session")
def tiny_llama(root: Path) -> Path:
    """A tiny random Llama with the ChatML tokenizer (context 256)."""
    from tinymodels.llm import build_llm

    return build_llm(root / "models" / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tokenizer(tiny_llama: Path) -> Any:
    """The tiny Llama's tokenizer."""
    from trainer_service.strategies.base import load_tokenizer

    return load_tokenizer(tiny_llama)


@pytest.fixture(scope="session")
def data(root: Path) -> dict[str, Path]:
    """Valid datasets of every format."""
    folder = root / "data"
    return {
        "text": write_jsonl(
            folder / "text.jsonl", [{"text": f"Number {i} is a small number."} for i in range(8)]
        ),
        "prompt_completion": write_jsonl(
            folder / "pc.jsonl", [{"prompt": f"Double {i}:", "completion": f" {2 * i}"} for i in range(8)]
        ),
        "chat": write_jsonl(folder / "chat.jsonl", chat_rows()),
        "preference": write_jsonl(folder / "preference.jsonl", preference_rows()),
    }


@pytest.fixture(scope="session")
async def catalog(
    root: Path, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """Address of a real catalog serving on a free port, with the tiny Llama imported READY.

    It may import from anywhere under the tests' temporary folder (where the trainers write their outputs).
    """
    settings = CatalogSettings(
        data_dir=root / "catalog", allowed_roots=[tmp_path_factory.getbasetemp()], heartbeat_ttl_seconds=30
    )
    server = GrpcServer(CatalogApp(settings), "127.0.0.1:0", grace_seconds=1.0)
    await server.start()
    async with AsyncCatalogClient(server.target) as client:
        await client.import_model(str(tiny_llama), model_id="tiny-llama")
    yield server.target
    await server.stop(0)


@pytest.fixture
async def catalog_client(catalog: str) -> AsyncIterator[AsyncCatalogClient]:
    """A client of the test catalog."""
    async with AsyncCatalogClient(catalog) as client:
        yield client


def trainer_engine_spec() -> Any:
    """This machine's trainer engine spec (as the app computes it)."""
    from trainer_service.app import engine_spec
    from trainer_service.settings import TrainerSettings

    return engine_spec(TrainerSettings())


@pytest.fixture(scope="session")
def engine_spec() -> Any:
    """The trainer's engine spec (computed once: it imports transformers' mappings)."""
    return trainer_engine_spec()


@pytest.fixture
async def make_manager(
    tmp_path: Path, root: Path, engine_spec: Any, catalog: str
) -> AsyncIterator[Callable[..., JobManager]]:
    """Builds job managers on one data folder and database (a new one simulates a restarted trainer).

    Managers are stopped at the end of the test (workers still running are killed).
    """
    made: list[tuple[JobManager, JobStore, AsyncCatalogClient]] = []

    def make(**overrides: Any) -> JobManager:
        store = JobStore(f"sqlite:///{tmp_path / 'trainer.db'}")
        migrate(store.engine)
        client = AsyncCatalogClient(catalog)
        config = ManagerConfig(
            data_dir=tmp_path,
            worker_id="trainer-test",
            engine_spec=engine_spec,
            lease_seconds=30.0,
            poll_seconds=0.2,
            preempt_seconds=20.0,
            dataset_roots=[root, tmp_path],
            datasets_cache=tmp_path / "datasets-cache",
        )
        for key, value in overrides.items():
            setattr(config, key, value)
        manager = JobManager(store, client, config)
        made.append((manager, store, client))
        return manager

    yield make
    for manager, store, client in made:
        manager.config.preempt_seconds = 0.0
        await manager.stop()
        await client.close()
        store.close()


def postgres_url() -> str:
    """The PostgreSQL server tests may use (MODELYARD_TEST_POSTGRES_URL)."""
    return os.environ.get(
        "MODELYARD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@localhost:5432/postgres"
    )
