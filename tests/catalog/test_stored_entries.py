"""Entries stored as serialized protos: migration 0003, identical reads, the byte-bounded cache.

The migration tests write rows the way revision 0002 stored them (the proto as JSON in
`models.data`) with plain SQL, upgrade, and read them back through the store.
"""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf import json_format
from sqlalchemy import inspect, text

from catalog_service import db
from catalog_service.entry_cache import ENTRY_OVERHEAD, ParsedCache, entry_bytes
from catalog_service.store import CatalogStore
from modelyard.catalog.v1 import model_pb2, worker_pb2
from server_kit import errors, paging


def rich_entry(model_id: str) -> model_pb2.Model:
    """An entry with every kind of field a read must give back unchanged."""
    model = model_pb2.Model(
        name=f"models/{model_id}",
        display_name="Tiny Llama ünïcode",
        author="org",
        state=model_pb2.MODEL_STATE_READY,
        kind=model_pb2.MODEL_KIND_LLM,
        local_path=f"/models/{model_id}",
        tags=["chat", "tiny"],
        labels={"team": "nlp", "tier": "gold"},
        etag="0123456789abcdef",
        version=1,
    )
    model.create_time.FromSeconds(1_700_000_000)
    model.update_time.FromSeconds(1_700_000_001)
    model.source.local.path = f"/models/{model_id}"
    model.llm.architecture = "LlamaForCausalLM"
    model.llm.model_type = "llama"
    model.llm.weight_format = model_pb2.WEIGHT_FORMAT_SAFETENSORS
    model.llm.context_length = 4096
    model.llm.parameter_count = 3_000_000
    model.llm.tokenizer.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    model.files.add(path="model.safetensors", size_bytes=12345, sha256="ab" * 32)
    return model


def _insert_json_row(conn: object, pk: int, model: model_pb2.Model) -> None:
    """A models row as revision 0002 wrote it (JSON in `data`)."""
    conn.execute(  # type: ignore[attr-defined]
        text(
            "INSERT INTO models (id, model_id, kind, model_type, architecture, state, weight_format, "
            "base_model, parent_id, source_key, local_path, hub_repo, version, etag, create_time, "
            "update_time, data) VALUES (:id, :model_id, 'MODEL_KIND_LLM', 'llama', 'LlamaForCausalLM', "
            "'MODEL_STATE_READY', 'WEIGHT_FORMAT_SAFETENSORS', '', NULL, '', :path, '', 1, :etag, "
            ":time, :time, :data)"
        ),
        {
            "id": pk,
            "model_id": model.name.removeprefix("models/"),
            "path": model.local_path,
            "etag": model.etag,
            "time": "2026-01-01 00:00:00+00:00",
            "data": json_format.MessageToJson(model, indent=None),
        },
    )


def test_migration_converts_existing_rows_and_back(empty_db_url: str) -> None:
    db_url = empty_db_url
    db.migrate(db_url, "0002")
    engine = db.make_engine(db_url)
    expected = [rich_entry(f"old-{i}") for i in range(3)]
    try:
        with engine.begin() as conn:
            for pk, model in enumerate(expected, start=1):
                _insert_json_row(conn, pk, model)
        db.migrate(db_url)
        assert db.current_revision(db_url) == "0003"
        columns = {c["name"] for c in inspect(engine).get_columns("models")}
        assert "entry" in columns and "data" not in columns

        store = CatalogStore(db_url, auto_migrate=False)
        try:
            for model in expected:
                assert store.get_model(model.name) == model
            listed, _ = store.list_models()
            assert listed == expected
            store.update_model(model_pb2.Model(name="models/old-0", description="changed"), ["description"])
        finally:
            store.close()

        db.downgrade(db_url, "0002")
        engine.dispose()
        columns = {c["name"] for c in inspect(engine).get_columns("models")}
        assert "data" in columns and "entry" not in columns
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT model_id, data FROM models ORDER BY id")).all()
        back = [json_format.Parse(data, model_pb2.Model()) for _id, data in rows]
        assert back[1:] == expected[1:]
        assert back[0].description == "changed"
    finally:
        engine.dispose()


def test_reads_return_the_entry_that_was_written(store: CatalogStore) -> None:
    created = store.create_model("exact", rich_entry("exact"))
    assert store.get_model("exact") == created
    assert store.list_models()[0] == [created]
    assert store.find_by_local_path("/models/exact") == created
    # A read is a copy: changing it changes nothing stored.
    read = store.get_model("exact")
    read.display_name = "mutated"
    assert store.get_model("exact") == created


def test_a_page_holds_entries_larger_than_their_inline_share(store: CatalogStore) -> None:
    """Entries above the page budget's even share are read in a second query, in order."""
    big = rich_entry("big")
    big.description = "x" * (paging.MAX_PAGE_BYTES // 101 + 1000)  # over the share at page_size 100
    for model_id in ("a-small", "big", "c-small"):
        entry = big if model_id == "big" else rich_entry(model_id)
        store.create_model(model_id, entry)
    models, token = store.list_models(page_size=100)
    assert [m.name for m in models] == ["models/a-small", "models/big", "models/c-small"]
    assert models[1].description == big.description
    assert token == ""


def test_worker_cache_is_bounded_by_bytes_and_evicts_least_recent() -> None:
    worker = worker_pb2.Worker(name="workers/w", address="127.0.0.1:1", display_name="x" * 500)
    one = entry_bytes("w-0", "check", worker.SerializeToString())
    assert one > len(worker.SerializeToString()) + ENTRY_OVERHEAD
    cache = ParsedCache(max_bytes=3 * one + one // 2)
    for i in range(3):
        cache.put(f"w-{i}", "check", worker)
    assert len(cache) == 3 and cache.bytes_used == 3 * one
    assert cache.get(worker_pb2.Worker, "w-0", "check") == worker  # w-0 is now the most recent
    cache.put("w-3", "check", worker)  # over the bound: w-1, the least recently used, goes
    assert len(cache) == 3 and cache.bytes_used <= cache.max_bytes
    assert cache.get(worker_pb2.Worker, "w-1", "check") is None
    assert cache.get(worker_pb2.Worker, "w-0", "check") == worker
    assert cache.get(worker_pb2.Worker, "w-0", "other version") is None  # stale check: a miss
    cache.discard(["w-0", "w-2", "w-3"])
    assert len(cache) == 0 and cache.bytes_used == 0


def test_an_entry_larger_than_the_cache_is_not_cached() -> None:
    worker = worker_pb2.Worker(name="workers/w", display_name="x" * 10_000)
    cache = ParsedCache(max_bytes=1000)
    cache.put("w", "check", worker)
    assert len(cache) == 0 and cache.bytes_used == 0
    disabled = ParsedCache(max_bytes=0)
    assert disabled.parse(worker_pb2.Worker, "w", "c", lambda: worker) == worker
    assert len(disabled) == 0


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
def test_workers_read_the_same_with_or_without_cache(db_url: str, cache_bytes: int) -> None:
    store = CatalogStore(db_url, auto_migrate=False, worker_cache_bytes=cache_bytes)
    try:
        registered = store.upsert_worker("w-1", worker_pb2.Worker(address="127.0.0.1:5"))
        assert store.get_worker("w-1") == registered
        beat = store.heartbeat("w-1", free_memory_bytes=42)
        assert store.get_worker("w-1") == beat
        assert beat.device.free_memory_bytes == 42
    finally:
        store.close()


@pytest.mark.postgres
def test_get_model_on_the_event_loop_reads_the_same(postgres_store: CatalogStore) -> None:
    """PostgreSQL's no-thread GetModel (`fast_reads.PostgresLookups`) answers like `get_model`."""
    store = postgres_store
    assert store.async_reads  # PostgreSQL stores read on the event loop
    created = store.create_model("on-loop", rich_entry("on-loop"))

    async def reads() -> None:
        assert await store.get_model_async("models/on-loop") == created
        with pytest.raises(errors.NotFound) as caught:
            await store.get_model_async("missing")
        assert caught.value.reason == "MODEL_NOT_FOUND"
        store._async_lookups.close()  # type: ignore[union-attr]  # a dropped connection comes back
        assert await store.get_model_async("on-loop") == created

    asyncio.run(reads())
    asyncio.run(reads())  # another loop: a connection of its own


@pytest.mark.postgres
def test_pages_on_the_event_loop_match_the_threaded_ones(postgres_store: CatalogStore) -> None:
    store = postgres_store
    assert store.async_reads  # PostgreSQL stores read on the event loop
    for i in range(5):
        store.create_model(f"page-{i}", rich_entry(f"page-{i}"))

    async def pages() -> None:
        first, token = await store.list_models_async(page_size=2)
        assert (first, token) == store.list_models(page_size=2)
        rest, end = await store.list_models_async(page_size=10, page_token=token)
        assert [m.name for m in first + rest] == [f"models/page-{i}" for i in range(5)]
        assert end == ""
        filtered, _ = await store.list_models_async(filter="name = page-3*")  # through a thread
        assert [m.name for m in filtered] == ["models/page-3"]

    asyncio.run(pages())
