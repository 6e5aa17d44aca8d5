"""Routing through the real catalog: best worker, why none fits, fail-over when a worker disappears.

The catalog is the real CatalogService (SQLite); the workers are fake
inference servers registered with llama-cpp capabilities (the models are
GGUF files), each answering with its own name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from clients.catalog import AsyncCatalogClient
from clients.errors import ModelyardRpcError
from clients.inference import AsyncInferenceClient, InferenceClient
from clients.routing import AsyncRoutedInferenceClient, NoCompatibleWorker, RoutedInferenceClient
from modelyard.catalog.v1 import worker_pb2
from tests.clients.conftest import Catalog, Served
from tests.clients.doubles import ServerThread


@pytest.fixture
def fleet(catalog: Catalog, gguf_dir: Path, start_worker: Callable[..., Served]) -> dict[str, Served]:
    """Model `tiny` (GGUF) and three registered workers: a (most free memory), b, and a vllm one."""
    catalog.import_gguf(gguf_dir, "tiny")
    workers = {name: start_worker(f"answer from {name}") for name in ("a", "b", "v")}
    catalog.register("worker-a", workers["a"].address, free_gib=8)
    catalog.register("worker-b", workers["b"].address, free_gib=4)
    catalog.register("worker-v", workers["v"].address, engine="vllm", free_gib=12)
    return workers


def test_for_model_connects_to_the_best_compatible_worker(catalog: Catalog, fleet: dict[str, Served]) -> None:
    ranked = catalog.client.find_workers("tiny", worker_pb2.WORKER_ROLE_INFERENCE)
    assert [m.worker.name for m in ranked.matches] == ["workers/worker-a", "workers/worker-b"]
    with InferenceClient.for_model("tiny", catalog=catalog.address) as client:
        assert client.address == fleet["a"].address
        assert client.worker is not None and client.worker.name == "workers/worker-a"
        assert client.generate("tiny", "hi").completions[0].text == "answer from a"
    # A catalog client works as well as an address.
    with InferenceClient.for_model("tiny", catalog=catalog.client) as client:
        assert client.address == fleet["a"].address


def test_no_compatible_worker_says_why_for_each_worker(catalog: Catalog, fleet: dict[str, Served]) -> None:
    with pytest.raises(NoCompatibleWorker) as raised:
        InferenceClient.for_model("tiny", catalog=catalog.address, role=worker_pb2.WORKER_ROLE_TRAINING)
    error = raised.value
    assert isinstance(error, ModelyardRpcError)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "NO_COMPATIBLE_WORKER"
    assert error.metadata == {"model": "models/tiny", "role": "training"}
    # Every rejected worker is named with the catalog's own failing rule messages.
    answer = catalog.client.find_workers("tiny", worker_pb2.WORKER_ROLE_TRAINING)
    assert {m.worker.name for m in error.rejected} == {
        "workers/worker-a",
        "workers/worker-b",
        "workers/worker-v",
    }
    for match in answer.rejected:
        failing = [r for r in match.report.results if r.outcome == worker_pb2.RULE_OUTCOME_FAIL]
        assert failing
        for result in failing:
            assert f"{result.rule}: {result.message}" in error.message
        assert match.worker.name in error.message


def test_no_worker_registered(catalog: Catalog, gguf_dir: Path) -> None:
    catalog.import_gguf(gguf_dir, "lonely")
    with pytest.raises(NoCompatibleWorker, match="no inference worker is registered"):
        InferenceClient.for_model("lonely", catalog=catalog.address)


def test_routed_client_fails_over_when_the_best_worker_disappears(
    catalog: Catalog, fleet: dict[str, Served], server_thread: ServerThread
) -> None:
    with RoutedInferenceClient(catalog.address, timeout=10) as client:
        assert client.generate("tiny", "hi").completions[0].text == "answer from a"
        assert client.last_address == fleet["a"].address
        server_thread.stop(fleet["a"].server)  # worker a is gone; the catalog still lists it
        assert client.generate("tiny", "hi").completions[0].text == "answer from b"
        assert client.last_address == fleet["b"].address
        # Streams fail over too (before their first delta).
        text = "".join(d.text for d in client.stream_generate("tiny", "hi"))
        assert text == "answer from b"
        assert client.chat("tiny", [("user", "yo")]).choices[0].message.content == "echo 1: yo"


def test_routed_client_raises_unavailable_when_every_worker_is_gone(
    catalog: Catalog, fleet: dict[str, Served], server_thread: ServerThread
) -> None:
    server_thread.stop(fleet["a"].server)
    server_thread.stop(fleet["b"].server)
    with (
        RoutedInferenceClient(catalog.address, timeout=10) as client,
        pytest.raises(ModelyardRpcError) as error,
    ):
        client.generate("tiny", "hi")
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


def test_routed_client_does_not_fail_over_on_other_errors(catalog: Catalog, fleet: dict[str, Served]) -> None:
    with RoutedInferenceClient(catalog.address) as client, pytest.raises(ModelyardRpcError) as error:
        client.generate("tiny", "!refuse")
    assert (error.value.code, error.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PROMPT_REFUSED")
    assert len(fleet["a"].servicer.requests) == 1
    assert fleet["b"].servicer.requests == []  # a worker's answer is not retried elsewhere


async def test_async_for_model_and_fail_over(
    catalog: Catalog, fleet: dict[str, Served], server_thread: ServerThread
) -> None:
    async with AsyncCatalogClient(catalog.address) as async_catalog:
        client = await AsyncInferenceClient.for_model("tiny", catalog=async_catalog)
        async with client:
            assert (await client.generate("tiny", "hi")).completions[0].text == "answer from a"
        async with AsyncRoutedInferenceClient(async_catalog) as routed:
            assert (await routed.generate("tiny", "x")).completions[0].text == "answer from a"
            server_thread.stop(fleet["a"].server)
            deltas = [d.text async for d in routed.stream_generate("tiny", "x")]
            assert "".join(deltas) == "answer from b"
            assert routed.last_address == fleet["b"].address
        with pytest.raises(NoCompatibleWorker):
            await AsyncInferenceClient.for_model(
                "tiny", catalog=catalog.address, role=worker_pb2.WORKER_ROLE_TRAINING
            )


def test_route_table_stays_bounded_with_many_model_names() -> None:
    """Routes are keyed by request-supplied names: stale ones are dropped, the table has a cap."""
    from clients.routing import RouteTable

    table = RouteTable(refresh_seconds=10)
    for index in range(5000):
        table.put(f"models/m-{index}", ["a:1"], now=float(index))
    assert len(table) <= 1024
    assert table.get("models/m-4999", now=4999.0) == ["a:1"]
    table2 = RouteTable(refresh_seconds=1e9)
    for index in range(5000):
        table2.put(f"models/m-{index}", ["a:1"], now=float(index))
    assert len(table2) <= RouteTable.MAX_ROUTES
    assert table2.get("models/m-4999", now=4999.0) == ["a:1"]
