"""Tracing across services and the inference metrics, on real catalog and inference servers.

A catalog and an inference server (transformers engine, the fastest to start)
run in this process, with an in-memory span exporter installed before they
start, so spans from both sides can be read back; the inference server serves
`/metrics` on a free port and is scraped over HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from clients.catalog import CatalogClient
from clients.channel import open_channel
from clients.errors import ModelyardRpcError
from clients.inference import InferenceClient
from inference_service.app import InferenceApp
from inference_service.settings import InferenceSettings
from modelyard.inference.v1 import inference_service_pb2 as pb
from modelyard.inference.v1 import inference_service_pb2_grpc as pb_grpc
from server_kit import tracing
from tests.observability.scrape import Samples, scrape, value
from tests.servers import ThreadedServer
from tinymodels.llm import build_llm

INFERENCE = "modelyard.inference.v1.InferenceService"
CATALOG = "modelyard.catalog.v1.CatalogService"
MODEL = "models/llama"
REQUEST_LIMIT = 7


class Stack:
    """Catalog + inference servers with tracing into `exporter` and inference metrics on HTTP."""

    def __init__(self, root: Path) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        tracing.install(self.provider)  # before the servers start: they choose interceptors then
        model = build_llm(root / "tiny-llama", arch="llama")
        self.catalog_server = ThreadedServer(
            CatalogApp(CatalogSettings(data_dir=root / "catalog", allowed_roots=[root]))
        )
        with CatalogClient(self.catalog_server.target) as catalog:
            catalog.import_model(str(model), model_id="llama")
        self.app = InferenceApp(
            InferenceSettings(
                data_dir=root / "inference",
                catalog_address=self.catalog_server.target,
                engine="transformers",
                dtype="float32",
                max_concurrent_requests=REQUEST_LIMIT,
                worker_id="inference-observed",
            )
        )
        self.inference_server = ThreadedServer(self.app, metrics_listen="127.0.0.1:0")
        assert self.inference_server.server.metrics is not None
        self.metrics_port = self.inference_server.server.metrics.port
        self.client = InferenceClient(self.inference_server.target)

    def close(self) -> None:
        self.client.close()
        self.inference_server.stop()
        self.catalog_server.stop()
        tracing.install(None)
        self.provider.shutdown()

    def scrape(self) -> Samples:
        return scrape(self.metrics_port)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("observed"))
    try:
        yield running
    finally:
        running.close()


def _spans_of_trace(spans: tuple[ReadableSpan, ...], trace_id: int) -> list[ReadableSpan]:
    return [s for s in spans if s.context is not None and s.context.trace_id == trace_id]


def test_a_load_that_calls_the_catalog_is_one_trace_across_both_servers(stack: Stack) -> None:
    if any(m.model == MODEL for m in stack.client.list_loaded_models()):
        stack.client.unload_model(MODEL)
    stack.exporter.clear()
    # A raw stub on the typed clients' channel: it carries the trace context, we add a request id.
    with open_channel(stack.inference_server.target, INFERENCE) as channel:
        pb_grpc.InferenceServiceStub(channel).LoadModel(
            pb.LoadModelRequest(model=MODEL), timeout=300, metadata=[("x-request-id", "trace-req-7")]
        )
    spans = stack.exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name == f"{INFERENCE}/LoadModel" and s.kind == SpanKind.CLIENT]
    assert root.parent is None and root.context is not None
    trace = _spans_of_trace(spans, root.context.trace_id)
    by_id = {s.context.span_id: s for s in trace if s.context is not None}

    (load,) = [s for s in trace if s.name == f"{INFERENCE}/LoadModel" and s.kind == SpanKind.SERVER]
    assert load.parent is not None and load.parent.span_id == root.context.span_id
    assert load.attributes is not None and load.attributes["modelyard.request_id"] == "trace-req-7"

    # The inference server asked the catalog for the model and the compatibility verdict; each
    # call is a CLIENT span under the LoadModel span, and a SERVER span on the catalog under it.
    catalog_side = [s for s in trace if s.kind == SpanKind.SERVER and s.name.startswith(CATALOG)]
    assert {s.name for s in catalog_side} >= {f"{CATALOG}/GetModel", f"{CATALOG}/CheckCompatibility"}
    for server_span in catalog_side:
        assert server_span.parent is not None
        client_span = by_id[server_span.parent.span_id]
        assert client_span.kind == SpanKind.CLIENT and client_span.name == server_span.name
        assert client_span.parent is not None and load.context is not None
        assert client_span.parent.span_id == load.context.span_id
        # The request id travelled with the call, so the catalog's logs carry it too.
        assert server_span.attributes is not None
        assert server_span.attributes["modelyard.request_id"] == "trace-req-7"
        assert server_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]


def test_a_failed_call_marks_its_client_span_as_an_error(stack: Stack) -> None:
    stack.exporter.clear()
    with pytest.raises(ModelyardRpcError) as failed:
        stack.client.unload_model("models/never-loaded")
    assert failed.value.code == grpc.StatusCode.NOT_FOUND
    (client_span,) = [
        s
        for s in stack.exporter.get_finished_spans()
        if s.name == f"{INFERENCE}/UnloadModel" and s.kind == SpanKind.CLIENT
    ]
    assert client_span.status.status_code.name == "ERROR"
    assert client_span.attributes is not None
    assert client_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


def _delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return (value(after, name, **labels) or 0.0) - (value(before, name, **labels) or 0.0)


def test_metrics_count_tokens_first_token_times_and_rpcs(stack: Stack) -> None:
    stack.client.load_model(MODEL)
    before = stack.scrape()
    replies = [
        stack.client.generate(MODEL, f"hello {i}", max_tokens=5, temperature=0, ignore_eos=True)
        for i in range(2)
    ]
    deltas = list(stack.client.stream_generate(MODEL, "stream", max_tokens=4, temperature=0, ignore_eos=True))
    after = stack.scrape()

    prompt_tokens = sum(r.usage.prompt_tokens for r in replies) + deltas[-1].usage.prompt_tokens
    model = {"model": MODEL}
    assert _delta(after, before, "modelyard_inference_generated_tokens_total", **model) == 5 + 5 + 4
    assert _delta(after, before, "modelyard_inference_prompt_tokens_total", **model) == prompt_tokens
    assert (
        _delta(after, before, "modelyard_inference_completions_total", **model, finish_reason="length") == 3
    )
    assert _delta(after, before, "modelyard_inference_time_to_first_token_seconds_count", **model) == 3
    rpc = {"grpc_service": INFERENCE, "grpc_code": "OK"}
    handled = "modelyard_grpc_server_handled_total"
    assert _delta(after, before, handled, **rpc, grpc_method="Generate", grpc_type="unary") == 2
    assert _delta(after, before, handled, **rpc, grpc_method="StreamGenerate", grpc_type="server_stream") == 1
    # Idle again: nothing admitted, nothing in the engine; the limit is the configured one.
    assert value(after, "modelyard_inference_requests_running") == 0
    assert value(after, "modelyard_inference_requests_limit") == REQUEST_LIMIT
    engine = {"model": MODEL, "engine": "transformers"}
    assert value(after, "modelyard_inference_engine_requests", **engine, state="running") == 0
    assert value(after, "modelyard_inference_engine_requests", **engine, state="waiting") == 0
    assert value(after, "modelyard_inference_kv_cache_usage_ratio", **engine) is None  # transformers: unknown
    assert value(after, "modelyard_inference_loaded_adapters", model=MODEL) == 0


def test_a_running_stream_is_in_flight_and_a_cancelled_one_is_counted_cancelled(stack: Stack) -> None:
    stack.client.load_model(MODEL)
    stream = {"grpc_service": INFERENCE, "grpc_method": "StreamGenerate"}
    handled = "modelyard_grpc_server_handled_total"
    cancelled = {**stream, "grpc_type": "server_stream", "grpc_code": "CANCELLED"}
    before = stack.scrape()
    with grpc.insecure_channel(stack.inference_server.target) as channel:
        call = pb_grpc.InferenceServiceStub(channel).StreamGenerate(
            pb.StreamGenerateRequest(
                model=MODEL,
                prompt="a long story",
                sampling=pb.SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True),
            ),
            timeout=60,
        )
        next(call)  # generation is under way
        during = stack.scrape()
        call.cancel()
    assert value(during, "modelyard_grpc_server_in_flight", **stream) == 1
    assert value(during, "modelyard_inference_requests_running") == 1
    engine = {"model": MODEL, "engine": "transformers"}
    assert value(during, "modelyard_inference_engine_requests", **engine, state="running") == 1

    deadline = time.monotonic() + 10
    after = stack.scrape()
    while _delta(after, before, handled, **cancelled) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        after = stack.scrape()
    assert _delta(after, before, handled, **cancelled) == 1
    assert value(after, "modelyard_grpc_server_in_flight", **stream) == 0
    assert value(after, "modelyard_inference_requests_running") == 0
