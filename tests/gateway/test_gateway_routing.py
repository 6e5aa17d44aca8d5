"""The gateway without an engine: model listing, the error mapping, auth, bad requests.

A real catalog (and, for auth, one that checks tokens) and the gateway in front of it;
no inference worker, so generating answers 503. Driven with OpenAI's own client.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from clients.catalog import CatalogClient
from clients.errors import ModelyardRpcError
from gateway import errors
from server_kit import security
from tests.gateway.conftest import ThreadedGateway
from tests.servers import ThreadedServer

READER_TOKEN = "reader-token-0123456789abcdef"
TOKENS = f"dashboard:reader:{READER_TOKEN}"


@dataclass
class Stack:
    catalog: ThreadedServer
    gateway: ThreadedGateway


def _catalog(root: Path, tiny_llm: Path, tiny_lora: Path, **options: object) -> ThreadedServer:
    settings = CatalogSettings(data_dir=root, allowed_roots=[tiny_llm.parent, tiny_lora.parent])
    return ThreadedServer(CatalogApp(settings), **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_llm: Path, tiny_lora: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("gateway-routing")
    catalog = _catalog(root / "catalog", tiny_llm, tiny_lora)
    gateway = None
    try:
        with CatalogClient(catalog.target) as client:
            client.import_model(str(tiny_llm), model_id="llama")
            client.import_model(str(tiny_lora), model_id="llama-lora")
        gateway = ThreadedGateway(catalog.target, root / "gateway")
        yield Stack(catalog, gateway)
    finally:
        if gateway is not None:
            gateway.stop()
        catalog.stop()


def test_models_lists_ready_llms_and_adapters_by_catalog_name(stack: Stack) -> None:
    models = {model.id: model for model in stack.gateway.client().models.list()}
    assert set(models) == {"llama", "llama-lora"}
    base, adapter = models["llama"], models["llama-lora"]
    assert base.object == "model" and base.owned_by == "modelyard" and base.created > 0
    assert base.model_extra is not None and base.model_extra["parent"] is None
    assert adapter.model_extra is not None and adapter.model_extra["parent"] == "llama"
    assert stack.gateway.client().models.retrieve("llama-lora").id == "llama-lora"


def test_unknown_model_is_404_model_not_found(stack: Stack) -> None:
    client = stack.gateway.client()
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_no_worker_is_503(stack: Stack) -> None:
    client = stack.gateway.client()
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model="llama", prompt="hello", max_tokens=4)
    assert caught.value.status_code == 503
    assert caught.value.code == "no_compatible_worker"
    assert "no inference worker" in caught.value.message
    with pytest.raises(openai.InternalServerError) as streamed:
        client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert streamed.value.status_code == 503


def test_bad_requests_are_400_in_openai_shape(stack: Stack) -> None:
    url = f"http://127.0.0.1:{stack.gateway.port}/v1/chat/completions"
    missing = httpx.post(url, json={"model": "llama"})
    assert missing.status_code == 400
    error = missing.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "messages" and error["type"] == "BadRequestError"
    wrong_type = httpx.post(url, json={"model": "llama", "messages": [], "temperature": "hot"})
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"] == "temperature"
    not_json = httpx.post(url, content=b"{", headers={"content-type": "application/json"})
    assert not_json.status_code == 400
    client = stack.gateway.client()
    hi: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as template:
        client.chat.completions.create(model="llama", messages=hi, extra_body={"chat_template": "{{ 1 }}"})
    assert template.value.param == "chat_template"
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(
            model="llama",
            messages=hi,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert tools.value.param == "tools"
    unknown_route = httpx.get(f"http://127.0.0.1:{stack.gateway.port}/v1/nothing")
    assert unknown_route.status_code == 404 and "error" in unknown_route.json()


def test_health_metrics_and_request_id(stack: Stack) -> None:
    base = f"http://127.0.0.1:{stack.gateway.port}"
    assert httpx.get(f"{base}/health").status_code == 200
    listed = httpx.get(f"{base}/v1/models", headers={"x-request-id": "gw-test-1"})
    assert listed.headers["x-request-id"] == "gw-test-1"
    metrics = httpx.get(f"{base}/metrics").text
    assert 'modelyard_http_requests_total{handler="/v1/models",method="GET",status="200"}' in metrics
    assert "modelyard_http_request_duration_seconds_bucket" in metrics


@pytest.mark.parametrize(
    ("code", "reason", "status", "kind"),
    [
        (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", 404, "model_not_found"),
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SAMPLING", 400, "invalid_sampling"),
        (grpc.StatusCode.OUT_OF_RANGE, "", 400, "out_of_range"),
        (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", 401, "invalid_api_key"),
        (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", 403, "permission_denied"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_REQUESTS", 429, "too_many_requests"),
        (grpc.StatusCode.UNAVAILABLE, "ENGINE_FAILED", 503, "engine_failed"),
        (grpc.StatusCode.FAILED_PRECONDITION, "NO_COMPATIBLE_WORKER", 503, "no_compatible_worker"),
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            "MODEL_UNSUPPORTED_BY_ENGINE",
            400,
            "model_unsupported_by_engine",
        ),
        (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_INCOMPATIBLE", 400, "model_incompatible"),
        (
            grpc.StatusCode.UNIMPLEMENTED,
            "STRUCTURED_OUTPUT_UNSUPPORTED",
            400,
            "structured_output_unsupported",
        ),
        (grpc.StatusCode.INTERNAL, "", 500, "internal_error"),
        (grpc.StatusCode.UNKNOWN, "", 500, "internal_error"),
    ],
)
def test_the_one_error_mapping(code: grpc.StatusCode, reason: str, status: int, kind: str) -> None:
    rpc_error = ModelyardRpcError(
        code=code, message="the service's words", reason=reason, metadata={"request_id": "r1"}
    )
    error = errors.from_rpc_error(rpc_error)
    assert (error.status, error.code) == (status, kind)
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    if status == 500:
        assert body["message"] == "internal error (request id r1)"  # no internals leak
    else:
        assert body["message"] == "the service's words"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, tiny_llm: Path, tiny_lora: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("gateway-auth")
    guard = security.server_security(
        tls_cert=None, tls_key=None, tls_client_ca=None, tokens_file=None, tokens=TOKENS,
        audit_log="off", data_dir=root,
    )  # fmt: skip
    catalog = _catalog(root / "catalog", tiny_llm, tiny_lora, interceptors=[guard.interceptor])
    gateway = ThreadedGateway(catalog.target, root / "gateway")
    try:
        yield Stack(catalog, gateway)
    finally:
        gateway.stop()
        catalog.stop()


def test_tokens_are_checked_by_the_services_role_table(secured: Stack) -> None:
    with pytest.raises(openai.AuthenticationError) as anonymous:
        secured.gateway.client(api_key="wrong-token-0123456789").models.list()
    assert anonymous.value.status_code == 401 and anonymous.value.code == "invalid_api_key"
    no_header = httpx.get(f"{secured.gateway.base_url}/models")
    assert no_header.status_code == 401
    malformed = httpx.get(f"{secured.gateway.base_url}/models", headers={"authorization": "Basic x"})
    assert malformed.status_code == 401
    assert secured.gateway.client(api_key=READER_TOKEN).models.list().data == []


def test_a_request_is_traced_into_its_grpc_calls(stack: Stack, tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from server_kit import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)  # before the gateway opens its channels: they choose interceptors then
    gateway = ThreadedGateway(stack.catalog.target, tmp_path)
    try:
        trace_id = "0af7651916cd43dd8448eb211c80319c"
        listed = httpx.get(
            f"{gateway.base_url}/models", headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
        )
        assert listed.status_code == 200
    finally:
        gateway.stop()
        tracing.install(None)
        provider.shutdown()
    finished = exporter.get_finished_spans()
    spans = [s for s in finished if s.context is not None and s.context.trace_id == int(trace_id, 16)]
    (server,) = [s for s in spans if s.name == "GET /v1/models"]
    assert server.parent is not None and server.parent.span_id == int("b7ad6b7169203331", 16)
    assert server.attributes is not None and server.attributes["http.response.status_code"] == 200
    calls = [s for s in spans if "ListModels" in s.name]
    assert calls and all(c.parent is not None and c.parent.span_id == server.context.span_id for c in calls)
