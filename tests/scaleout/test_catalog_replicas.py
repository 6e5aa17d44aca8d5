"""Two catalog processes on one PostgreSQL database serve the same catalog.

What a client writes through replica A (imports, updates, worker
registrations, heartbeats) is what replica B reads; an etag issued by one is
checked by the other; two replicas racing to create the same id let exactly
one win. The replicas start together on a brand-new database, so their
migrations race too (an advisory lock serializes them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients.catalog import CatalogClient
from clients.errors import ModelyardRpcError
from modelyard.catalog.v1 import catalog_service_pb2, model_pb2, worker_pb2
from server_kit import capabilities
from tests.pg import postgres_database
from tests.scaleout.conftest import Fleet

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, workdir: Path
) -> Iterator[tuple[CatalogClient, CatalogClient]]:
    """Clients of catalog replicas A and B, started at once on one new PostgreSQL database."""
    with postgres_database() as url:
        fleet = Fleet(tmp_path_factory.mktemp("catalogs"))
        env = {"MODELYARD_CATALOG_DATABASE_URL": url, "MODELYARD_CATALOG_ALLOWED_ROOTS": str(workdir)}
        try:
            servers = [fleet.start("catalog_service", name, env) for name in ("catalog-a", "catalog-b")]
            for server in servers:
                server.wait_serving(90)
            with CatalogClient(servers[0].address) as a, CatalogClient(servers[1].address) as b:
                yield a, b
        finally:
            fleet.stop()


def race(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run `calls` at the same moment on threads; each result or the ModelyardRpcError it raised."""
    results: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = calls[index]()
        except ModelyardRpcError as error:
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a call did not return within 60 s"
    return results


def test_a_model_imported_through_one_replica_is_served_by_the_other(
    replicas: tuple[CatalogClient, CatalogClient], tiny_llama: Path
) -> None:
    a, b = replicas
    imported = a.import_model(str(tiny_llama), model_id="shared-llama", labels={"team": "search"})
    assert imported.state == model_pb2.MODEL_STATE_READY

    seen = b.get_model("shared-llama")
    assert seen == imported  # same etag, files and hashes, detected config
    assert seen.llm.architecture == "LlamaForCausalLM"
    assert [m.name for m in b.list_models(filter="labels.team = search")] == ["models/shared-llama"]

    updated = a.update_model(
        model_pb2.Model(name="models/shared-llama", display_name="Shared"), ["display_name"]
    )
    assert b.get_model("shared-llama").display_name == "Shared"
    assert b.get_model("shared-llama").etag == updated.etag != imported.etag


def test_an_etag_from_one_replica_is_checked_by_the_other(
    replicas: tuple[CatalogClient, CatalogClient],
) -> None:
    a, b = replicas
    created = a.create_model("etag-model", model_pb2.Model(display_name="v1"))
    a.update_model(model_pb2.Model(name=created.name, display_name="v2", etag=created.etag), ["display_name"])

    # B is handed A's first etag: the write through B must not overwrite A's.
    stale = model_pb2.Model(name=created.name, display_name="v3", etag=created.etag)
    with pytest.raises(ModelyardRpcError) as raised:
        b.update_model(stale, ["display_name"])
    assert raised.value.code == grpc.StatusCode.ABORTED
    assert raised.value.reason == "ETAG_MISMATCH"
    assert a.get_model(created.name).display_name == "v2"

    # Read-modify-write through B with B's current etag works, and A sees it.
    current = b.get_model(created.name)
    b.update_model(model_pb2.Model(name=created.name, display_name="v3", etag=current.etag), ["display_name"])
    assert a.get_model(created.name).display_name == "v3"
    with pytest.raises(ModelyardRpcError) as raised:
        a.delete_model(created.name, etag=current.etag)  # stale again after B's write
    assert raised.value.code == grpc.StatusCode.ABORTED


def test_racing_updates_with_one_etag_let_exactly_one_through(
    replicas: tuple[CatalogClient, CatalogClient],
) -> None:
    a, b = replicas
    created = a.create_model("race-update", model_pb2.Model(display_name="start"))
    for round_ in range(4):
        etag = a.get_model(created.name).etag
        results = race(
            [
                partial(
                    client.update_model,
                    model_pb2.Model(name=created.name, display_name=who, etag=etag),
                    ["display_name"],
                )
                for client, who in ((a, f"a{round_}"), (b, f"b{round_}"))
            ]
        )
        winners = [r for r in results if isinstance(r, model_pb2.Model)]
        losers = [r for r in results if isinstance(r, ModelyardRpcError)]
        assert len(winners) == 1 and len(losers) == 1, results
        assert losers[0].code == grpc.StatusCode.ABORTED
        assert b.get_model(created.name).display_name == winners[0].display_name


def test_racing_creates_of_one_id_across_replicas_let_exactly_one_win(
    replicas: tuple[CatalogClient, CatalogClient],
) -> None:
    a, b = replicas
    for i in range(6):
        model_id = f"contested-{i}"
        results = race([partial(client.create_model, model_id, model_pb2.Model()) for client in (a, b)])
        winners = [r for r in results if isinstance(r, model_pb2.Model)]
        losers = [r for r in results if isinstance(r, ModelyardRpcError)]
        assert len(winners) == 1 and len(losers) == 1, results
        assert losers[0].code == grpc.StatusCode.ALREADY_EXISTS
        assert a.get_model(model_id) == b.get_model(model_id) == winners[0]


def test_racing_imports_of_one_id_leave_the_winner_ready(
    replicas: tuple[CatalogClient, CatalogClient], tiny_llama: Path
) -> None:
    a, b = replicas
    results = race(
        [partial(client.import_model, str(tiny_llama), model_id="imported-once") for client in (a, b)]
    )
    winners = [r for r in results if isinstance(r, model_pb2.Model)]
    losers = [r for r in results if isinstance(r, ModelyardRpcError)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert losers[0].code == grpc.StatusCode.ALREADY_EXISTS
    # The loser's failed import must not delete or fail the winner's entry.
    for client in (a, b):
        entry = client.get_model("imported-once")
        assert entry.state == model_pb2.MODEL_STATE_READY
        assert entry.etag == winners[0].etag


def test_workers_registered_through_one_replica_are_routed_by_the_other(
    replicas: tuple[CatalogClient, CatalogClient], tiny_llama: Path
) -> None:
    a, b = replicas
    a.import_model(str(tiny_llama), model_id="routed-llama")
    worker = worker_pb2.Worker(
        address="127.0.0.1:1",
        role=worker_pb2.WORKER_ROLE_INFERENCE,
        capabilities=capabilities.transformers_capabilities(),
        device=capabilities.describe_device(),
    )
    a.register_worker("replicated-worker", worker)

    seen = b.get_worker("replicated-worker")
    assert seen.address == "127.0.0.1:1" and seen.state == worker_pb2.WORKER_STATE_HEALTHY
    b.heartbeat(
        catalog_service_pb2.HeartbeatRequest(
            name="workers/replicated-worker", load=worker_pb2.WorkerLoad(running=3)
        )
    )
    assert a.get_worker("replicated-worker").load.running == 3

    matches = b.find_workers("routed-llama", worker_pb2.WORKER_ROLE_INFERENCE).matches
    assert "workers/replicated-worker" in [m.worker.name for m in matches]
    a.deregister_worker("replicated-worker")
    with pytest.raises(ModelyardRpcError) as raised:
        b.get_worker("replicated-worker")
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
