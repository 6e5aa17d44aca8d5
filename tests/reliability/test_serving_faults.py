"""Faults under a serving deployment (catalog + vLLM inference as processes):

- the catalog dies: inference keeps serving its loaded models, and its worker is back in
  the catalog (heartbeating, routable) soon after the catalog returns, also when the
  catalog came back without its database;
- vLLM's engine process dies: health turns NOT_SERVING, requests fail fast with
  UNAVAILABLE (`ENGINE_FAILED`), and the model is reloaded by itself.

Each test leaves the shared `stack` serving again. Every wait is bounded.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import grpc
import pytest
from grpc_health.v1 import health_pb2

from clients.catalog import CatalogClient
from clients.errors import ModelyardRpcError
from clients.inference import InferenceClient
from modelyard.catalog.v1 import worker_pb2
from modelyard.inference.v1 import inference_service_pb2
from tests.helpers import health_status
from tests.reliability.faults import sigkill, wait_until
from tests.reliability.stack import MODEL_ID, WORKER_ID, Stack

pytestmark = pytest.mark.slow

INFERENCE_SERVICE = "modelyard.inference.v1.InferenceService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RELOAD_TIMEOUT = 300.0
"""vLLM takes tens of seconds to start on 2 busy cores."""


def _greedy(inference: InferenceClient, prompt: str = "hello there") -> list[int]:
    reply = inference.generate(MODEL_ID, prompt, max_tokens=8, temperature=0.0, ignore_eos=True, timeout=60)
    return list(reply.completions[0].token_ids)


def _fresh_worker(stack: Stack, since: datetime) -> worker_pb2.Worker | None:
    """The inference worker as the catalog sees it, once HEALTHY with a heartbeat after `since`."""
    with CatalogClient(stack.catalog_address, timeout=5) as catalog:
        worker = catalog.get_worker(WORKER_ID)
    beat = worker.last_heartbeat_time.ToDatetime(tzinfo=UTC)
    return worker if worker.state == worker_pb2.WORKER_STATE_HEALTHY and beat > since else None


def test_catalog_down_inference_keeps_serving_and_the_worker_comes_back(stack: Stack) -> None:
    assert stack.catalog is not None
    wait_until(lambda: _fresh_worker(stack, datetime.min.replace(tzinfo=UTC)), 30, "the worker registered")
    with InferenceClient(stack.inference_address, timeout=60) as inference:
        expected = _greedy(inference)

        sigkill(stack.catalog)
        # The loaded model needs no catalog: unary and streaming generation go on.
        for _ in range(3):
            assert _greedy(inference) == expected
        deltas = list(inference.stream_generate(MODEL_ID, "hello there", max_tokens=8, temperature=0.0))
        assert [t for d in deltas for t in d.token_ids] == expected
        # What does need the catalog says so, at once.
        with pytest.raises(ModelyardRpcError) as no_catalog:
            inference.generate("some-other-model", "hi", max_tokens=2)
        assert no_catalog.value.code == grpc.StatusCode.UNAVAILABLE
        assert no_catalog.value.reason == "CATALOG_UNAVAILABLE"

    restarted = datetime.now(UTC)
    stack.start_catalog(stack.root / "catalog")  # same data, same address
    worker = wait_until(lambda: _fresh_worker(stack, restarted), 30, "the worker heartbeating the catalog")
    assert [m.model for m in worker.loaded_models] == [f"models/{MODEL_ID}"]
    with CatalogClient(stack.catalog_address) as catalog:
        matches = catalog.find_workers(MODEL_ID, worker_pb2.WORKER_ROLE_INFERENCE).matches
        assert [m.worker.name for m in matches] == [f"workers/{WORKER_ID}"]


def test_worker_registers_again_with_a_catalog_that_lost_its_database(stack: Stack) -> None:
    assert stack.catalog is not None
    sigkill(stack.catalog)
    restarted = datetime.now(UTC)
    try:
        stack.start_catalog(stack.root / "empty-catalog")  # a new, empty database
        worker = wait_until(lambda: _fresh_worker(stack, restarted), 30, "the worker registering again")
        assert worker.role == worker_pb2.WORKER_ROLE_INFERENCE
        assert worker.capabilities.engine == "vllm"
        assert [m.model for m in worker.loaded_models] == [f"models/{MODEL_ID}"]
    finally:
        if stack.catalog is not None:
            sigkill(stack.catalog)
        stack.start_catalog(stack.root / "catalog")  # leave the stack as it was


def test_engine_process_killed_turns_not_serving_fails_fast_and_reloads(stack: Stack) -> None:
    with InferenceClient(stack.inference_address, timeout=60) as inference:
        expected = _greedy(inference)
        (engine_core,) = stack.engine_cores()

        # A stream in flight when the engine dies ends with UNAVAILABLE, not a hang.
        first_delta = threading.Event()
        outcome: dict[str, object] = {}

        def stream() -> None:
            try:
                for _ in inference.stream_generate(
                    MODEL_ID, "a long one", max_tokens=240, ignore_eos=True, timeout=120
                ):
                    first_delta.set()
                outcome["finished"] = True
            except ModelyardRpcError as error:
                outcome["error"] = error
            finally:
                first_delta.set()

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        assert first_delta.wait(60), "the stream did not start"
        engine_core.kill()
        killed = time.monotonic()
        streamer.join(60)
        assert not streamer.is_alive(), "the stream hung after the engine died"
        error = outcome.get("error")
        assert isinstance(error, ModelyardRpcError), f"the stream ended with {outcome}"
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.reason == "ENGINE_FAILED"

        # Health says so; new requests fail fast and say why.
        wait_until(
            lambda: health_status(stack.inference_address, INFERENCE_SERVICE) == NOT_SERVING,
            15,
            "health NOT_SERVING",
        )
        with pytest.raises(ModelyardRpcError) as failed:
            _greedy(inference)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
        assert failed.value.reason == "ENGINE_FAILED"
        assert time.monotonic() - killed < 60

        # The model is reloaded by itself: SERVING again, same answers, a new engine process.
        wait_until(
            lambda: health_status(stack.inference_address, INFERENCE_SERVICE) == SERVING,
            RELOAD_TIMEOUT,
            "health SERVING after the reload",
            interval=0.5,
        )
        assert health_status(stack.inference_address) == SERVING
        assert _greedy(inference) == expected
        (new_core,) = stack.engine_cores()
        assert new_core.pid != engine_core.pid
        loaded = inference.list_loaded_models()
        assert [(m.model, m.state) for m in loaded] == [
            (f"models/{MODEL_ID}", inference_service_pb2.LOADED_MODEL_STATE_READY)
        ]
