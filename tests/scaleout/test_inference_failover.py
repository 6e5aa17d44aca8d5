"""Two real inference workers behind the catalog: requests are routed, and fail over when one dies.

Both workers (transformers engine, for a fast start) register with a real
catalog whose heartbeat TTL is 2 s; a third registration is an image worker
that cannot run the LLM. The routed client sends every request to a
compatible worker; after the worker serving it is SIGKILLed (no deregistration,
no goodbye) requests go on succeeding through the other, the catalog turns the
dead worker UNAVAILABLE once its heartbeat lapses, and from then on routing
skips it.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from clients.catalog import CatalogClient
from clients.routing import RoutedInferenceClient
from modelyard.catalog.v1 import worker_pb2
from server_kit import capabilities
from tests.helpers import ServerProcess
from tests.scaleout.conftest import Fleet, wait_until

pytestmark = pytest.mark.slow

TTL_SECONDS = 2


def port_of(address: str) -> str:
    """`localhost:123` and `127.0.0.1:123` -> `123` (workers advertise localhost)."""
    return address.rsplit(":", 1)[1]


def test_requests_fail_over_to_the_surviving_worker(fleet: Fleet, workdir: Path, tiny_llama: Path) -> None:
    catalog = fleet.start(
        "catalog_service",
        "catalog",
        {
            "MODELYARD_CATALOG_ALLOWED_ROOTS": str(workdir),
            "MODELYARD_CATALOG_HEARTBEAT_TTL": str(TTL_SECONDS),
        },
    )
    catalog.wait_serving(60)
    workers: dict[str, ServerProcess] = {
        name: fleet.start(
            "inference_service",
            name,
            {
                "MODELYARD_CATALOG_ADDRESS": catalog.address,
                "MODELYARD_INFERENCE_ENGINE": "transformers",
                "MODELYARD_INFERENCE_WORKER_ID": name,
                "OMP_NUM_THREADS": "1",
            },
        )
        for name in ("worker-a", "worker-b")
    }
    with CatalogClient(catalog.address) as catalog_client:
        catalog_client.import_model(str(tiny_llama), model_id="tiny-llama")
        image_worker = worker_pb2.Worker(
            address="127.0.0.1:1",  # nothing listens there: routing to it would fail
            role=worker_pb2.WORKER_ROLE_INFERENCE,
            capabilities=capabilities.diffusers_capabilities(),
        )
        catalog_client.register_worker("image-worker", image_worker)
        for worker in workers.values():
            worker.wait_serving(120)

        def routed() -> set[str]:
            answer = catalog_client.find_workers("tiny-llama", worker_pb2.WORKER_ROLE_INFERENCE)
            return {m.worker.name for m in answer.matches}

        wait_until(lambda: routed() == {"workers/worker-a", "workers/worker-b"}, 30, "both workers routable")
        rejected = catalog_client.find_workers("tiny-llama", worker_pb2.WORKER_ROLE_INFERENCE).rejected
        assert [m.worker.name for m in rejected] == ["workers/image-worker"]

        by_port = {port_of(worker.address): name for name, worker in workers.items()}

        def served_by(client: RoutedInferenceClient) -> str:
            """The worker that answered the client's last request."""
            assert client.last_address is not None
            return by_port[port_of(client.last_address)]

        with RoutedInferenceClient(catalog_client, timeout=120, refresh_seconds=60) as client:
            answered = set()
            for i in range(3):
                reply = client.generate("tiny-llama", f"Hello {i}", max_tokens=4, temperature=0.0)
                assert reply.usage.completion_tokens > 0
                answered.add(served_by(client))
            assert len(answered) == 1  # the best worker serves while it lives
            victim = answered.pop()
            survivor = "worker-b" if victim == "worker-a" else "worker-a"

            workers[victim].terminate(signal.SIGKILL)
            workers[victim].proc.wait(30)
            for i in range(3):
                reply = client.generate("tiny-llama", f"After {i}", max_tokens=4, temperature=0.0)
                assert reply.usage.completion_tokens > 0
                assert served_by(client) == survivor
            streamed = list(client.stream_generate("tiny-llama", "Streaming", max_tokens=4))
            assert streamed and served_by(client) == survivor

        def state(worker_id: str) -> int:
            return int(catalog_client.get_worker(worker_id).state)

        wait_until(
            lambda: state(victim) == worker_pb2.WORKER_STATE_UNAVAILABLE,
            TTL_SECONDS * 5 + 10,
            f"{victim} UNAVAILABLE after its heartbeat lapsed",
        )
        assert state(survivor) == worker_pb2.WORKER_STATE_HEALTHY  # it keeps heartbeating
        assert routed() == {f"workers/{survivor}"}

        # A new client is routed straight to the survivor.
        with RoutedInferenceClient(catalog_client, timeout=60) as fresh:
            assert fresh.addresses("tiny-llama") == [catalog_client.get_worker(survivor).address]
            fresh.generate("tiny-llama", "Hi", max_tokens=2)
            assert served_by(fresh) == survivor
