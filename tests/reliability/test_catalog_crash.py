"""SIGKILL the catalog in the middle of an import and of a burst of writes; restart it on the same
database (SQLite file, and PostgreSQL): the store is consistent and takes work again.
"""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from clients.catalog import CatalogClient
from clients.errors import ModelyardRpcError
from modelyard.catalog.v1 import model_pb2
from tests.helpers import ServerProcess
from tests.reliability.faults import serve, sigkill, wait_until

pytestmark = pytest.mark.slow

PADDING_BYTES = 6 * 1024**3
"""A sparse file this big (no disk used) keeps the import hashing for seconds: time to kill it."""

UNFINISHED = (model_pb2.MODEL_STATE_IMPORTING, model_pb2.MODEL_STATE_VALIDATING)


def start_catalog(tmp_path: Path, database_url: str, log_name: str) -> ServerProcess:
    """The catalog as a process on `database_url`, importing from anywhere under `tmp_path`."""
    catalog = serve(
        "catalog_service",
        ["--data-dir", str(tmp_path / "catalog")],
        {"MODELYARD_CATALOG_DATABASE_URL": database_url, "MODELYARD_CATALOG_ALLOWED_ROOTS": str(tmp_path)},
        log_path=tmp_path / f"{log_name}.log",
    )
    catalog.wait_serving()
    return catalog


def test_import_killed_midway_is_failed_after_restart_and_the_source_imports_again(
    tmp_path: Path, tiny_llm: Path, database_url: str
) -> None:
    source = tmp_path / "models" / "slow-llama"
    shutil.copytree(tiny_llm, source)
    padding = source / "padding.dat"
    with padding.open("wb") as handle:
        handle.truncate(PADDING_BYTES)

    first = start_catalog(tmp_path, database_url, "first")
    try:
        with CatalogClient(first.address) as client, ThreadPoolExecutor(1) as pool:
            importing = pool.submit(client.import_model, str(source), model_id="slow-llama", timeout=120)
            seen = wait_until(lambda: client.get_model("slow-llama"), 60, "the import's entry")
            assert seen.state in UNFINISHED, "the import finished before it could be killed"
            sigkill(first)
            with pytest.raises(ModelyardRpcError) as killed:
                importing.result(timeout=60)
            assert killed.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        first.stop()

    second = start_catalog(tmp_path, database_url, "second")
    try:
        with CatalogClient(second.address) as client:
            entry = client.get_model("slow-llama")
            assert entry.state == model_pb2.MODEL_STATE_FAILED
            assert entry.error.reason == "IMPORT_INTERRUPTED"
            assert "import it again" in entry.error.message
            for state in ("IMPORTING", "VALIDATING"):
                assert list(client.list_models(filter=f"state = {state}")) == []
            assert [m.name for m in client.list_models(filter="state = FAILED")] == ["models/slow-llama"]

            # The same source imports again (quicker without the padding), under the next version...
            padding.unlink()
            again = client.import_model(str(source))
            assert again.state == model_pb2.MODEL_STATE_READY
            assert again.name == "models/slow-llama-v2"
            assert again.llm.architecture == "LlamaForCausalLM"
            # ...or under its own id once the FAILED entry is deleted.
            assert client.delete_model("slow-llama") == ["models/slow-llama"]
            redone = client.import_model(str(source), model_id="slow-llama")
            assert redone.state == model_pb2.MODEL_STATE_READY
            assert client.validate_model("slow-llama").valid
    finally:
        second.stop()


@dataclass
class _Record:
    """What a writer did to one entry: the last acknowledged version, and the one in flight."""

    acked: str | None = None
    pending: str | None = None

    def possible(self) -> set[str]:
        """The versions the entry may hold after a crash."""
        return {v for v in (self.acked, self.pending) if v is not None}


class _Ledger:
    def __init__(self) -> None:
        self.records: dict[str, _Record] = {}
        self.lock = threading.Lock()
        self.acked_writes = 0

    def attempt(self, model_id: str, version: str) -> None:
        with self.lock:
            self.records.setdefault(model_id, _Record()).pending = version

    def ack(self, model_id: str, version: str) -> None:
        with self.lock:
            record = self.records[model_id]
            record.acked, record.pending = version, None
            self.acked_writes += 1


VERSIONS = ("v0", "v1", "v2")


def _entry(model_id: str, version: str, writer: int) -> model_pb2.Model:
    """An entry whose fields all name its version, so a half-applied write would show."""
    return model_pb2.Model(
        name=f"models/{model_id}",
        display_name=version,
        description=version * 500,
        tags=[version, f"writer-{writer}"],
        labels={"version": version, "writer": str(writer)},
    )


def _write_until_killed(address: str, writer: int, ledger: _Ledger, stop: threading.Event) -> None:
    with CatalogClient(address, timeout=20) as client:
        index = 0
        while not stop.is_set():
            model_id = f"w{writer}-{index}"
            try:
                ledger.attempt(model_id, "v0")
                client.create_model(model_id, _entry(model_id, "v0", writer))
                ledger.ack(model_id, "v0")
                for version in VERSIONS[1:]:
                    ledger.attempt(model_id, version)
                    client.update_model(
                        _entry(model_id, version, writer), ["display_name", "description", "tags", "labels"]
                    )
                    ledger.ack(model_id, version)
            except ModelyardRpcError as error:
                assert error.code == grpc.StatusCode.UNAVAILABLE, error  # the server died, nothing else
                return
            index += 1


def test_writes_killed_midway_leave_every_entry_whole_or_absent(tmp_path: Path, database_url: str) -> None:
    ledger = _Ledger()
    stop = threading.Event()
    first = start_catalog(tmp_path, database_url, "first")
    try:
        with ThreadPoolExecutor(4) as pool:
            writers = [pool.submit(_write_until_killed, first.address, w, ledger, stop) for w in range(4)]
            wait_until(lambda: ledger.acked_writes >= 60, 90, "60 acknowledged writes")
            sigkill(first)
            with ledger.lock:
                assert any(r.pending for r in ledger.records.values()), "no write was in flight"
            stop.set()
            for writer in writers:
                writer.result(timeout=60)
    finally:
        stop.set()
        first.stop()

    second = start_catalog(tmp_path, database_url, "second")
    try:
        with CatalogClient(second.address) as client:
            # Every page parses: no entry holds corrupt JSON.
            listed = {m.name: m for m in client.list_models(page_size=7)}
            assert set(listed) <= {f"models/{model_id}" for model_id in ledger.records}
            for model_id, record in ledger.records.items():
                model = listed.get(f"models/{model_id}")
                if model is None:
                    assert record.acked is None, f"{model_id} was acknowledged, then lost"
                    with pytest.raises(ModelyardRpcError) as missing:
                        client.get_model(model_id)
                    assert missing.value.code == grpc.StatusCode.NOT_FOUND
                    continue
                version = model.display_name
                assert version in record.possible(), f"{model_id} holds {version}, not {record}"
                writer_id = model.labels["writer"]
                assert model == client.get_model(model_id)
                assert model.description == version * 500
                assert list(model.tags) == [version, f"writer-{writer_id}"]
                assert dict(model.labels) == {"version": version, "writer": writer_id}
            # The filter indexes (tag and label rows) agree with the entries: written together.
            for version in VERSIONS:
                expected = {name for name, m in listed.items() if m.display_name == version}
                by_label = {m.name for m in client.list_models(filter=f'labels.version = "{version}"')}
                by_tag = {m.name for m in client.list_models(filter=f'tag = "{version}"')}
                assert by_label == expected
                assert by_tag == expected
            # And the catalog takes writes again.
            client.create_model("after-restart", model_pb2.Model(display_name="after"))
            assert client.get_model("after-restart").display_name == "after"
    finally:
        second.stop()
