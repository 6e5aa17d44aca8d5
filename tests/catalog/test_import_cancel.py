"""A cancelled import leaves no entry behind and stops hashing (issue 14, item 4).

The catalog runs in-process on SQLite; the import task is cancelled the way gRPC
cancels a handler whose client gave up (deadline, disconnect).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from catalog_service import db, hashing
from catalog_service.catalog import Catalog, ImportOptions
from catalog_service.settings import CatalogSettings
from catalog_service.store import CatalogStore
from tinymodels.llm import build_llm


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    db.migrate(url)
    store = CatalogStore(url, heartbeat_ttl=30, auto_migrate=False)
    return Catalog(
        store, CatalogSettings(data_dir=tmp_path / "data", database_url=url, allowed_roots=[tmp_path])
    )


def _entries(catalog: Catalog) -> list[str]:
    models, _ = catalog.store.list_models(100, "", "")
    return [m.name for m in models]


async def _cancel_after(catalog: Catalog, source: Path, delay: float) -> None:
    task = asyncio.ensure_future(catalog.import_model(str(source), ImportOptions()))
    await asyncio.sleep(delay)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_cancel_while_hashing_stops_the_hashing_and_removes_the_entry(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_llm(tmp_path / "big-llama", arch="llama")
    with (model / "padding.bin").open("wb") as big:  # sparse: hashing it takes seconds
        big.truncate(4 * 1024**3)
    reads = {"bytes": 0}
    opened = hashing.open_regular

    class Counting:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def __enter__(self) -> Counting:
            self.handle.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.__exit__(*exc)

        def readinto(self, view: memoryview) -> int:
            count = int(self.handle.readinto(view))
            reads["bytes"] += count
            return count

    monkeypatch.setattr(hashing, "open_regular", lambda *a, **k: Counting(opened(*a, **k)))
    asyncio.run(_cancel_after(catalog, model, 0.3))
    assert _entries(catalog) == []
    after_cancel = reads["bytes"]
    time.sleep(0.5)
    assert reads["bytes"] == after_cancel, "hashing went on after the import was cancelled"
    assert after_cancel < 4 * 1024**3


@pytest.mark.parametrize("delay", [0.05, 0.2])
def test_cancel_while_the_entry_is_created_leaves_no_entry(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, delay: float
) -> None:
    model = build_llm(tmp_path / "tiny-llama", arch="llama")
    create = catalog.store.create_model
    saved = threading.Event()

    def slow_create(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)  # the request is cancelled while the row is being written
        created = create(*args, **kwargs)
        saved.set()
        return created

    monkeypatch.setattr(catalog.store, "create_model", slow_create)
    asyncio.run(_cancel_after(catalog, model, delay))
    assert saved.wait(2)
    time.sleep(0.3)
    assert _entries(catalog) == []
