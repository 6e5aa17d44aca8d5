"""The gateway's FastAPI app: OpenAI's routes on top of the typed asyncio clients.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`,
`POST /v1/embeddings`, `GET /health`, `GET /metrics`.

`create_app(catalog, inference)` takes an `AsyncCatalogClient` and an
`AsyncRoutedInferenceClient` (routing, fail-over and the route cache are theirs). Each
request runs on per-caller copies of them that share their channels and route table but
carry the caller's `Authorization: Bearer` token, so the services' role table answers
401/403. Streams are answered as server-sent events ending in `data: [DONE]`; the first
delta is awaited before the response starts, so a request that fails before generating
gets its real HTTP status. A client that disconnects cancels the gRPC stream, which
aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clients.catalog import AsyncCatalogClient, model_name
from clients.errors import ModelyardRpcError
from clients.inference import AsyncInferenceClient, sampling_params
from clients.routing import AsyncRoutedInferenceClient
from gateway import errors
from gateway.errors import GatewayError
from gateway.openai_types import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    ResponseFormat,
    _Sampling,
)
from modelyard.catalog.v1 import model_pb2
from modelyard.inference.v1 import inference_service_pb2 as pb
from server_kit import tracing
from server_kit.logs import request_id_var
from server_kit.metrics import LATENCY_BUCKETS, PREFIX

log = logging.getLogger("modelyard.gateway")

REQUEST_ID_HEADER = "x-request-id"
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/health", "/metrics")
_BEARER = re.compile(r"^\s*bearer\s+([\x21-\x7e]+)\s*$", re.IGNORECASE)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


# ------------------------------------------------------------------------------ per-caller clients


class _CallerRoutedClient(AsyncRoutedInferenceClient):
    """The shared routed client's routes and channels, with one caller's token on every call."""

    def __init__(self, shared: AsyncRoutedInferenceClient, catalog: AsyncCatalogClient, token: str | None):
        super().__init__(catalog, role=shared.role, refresh_seconds=shared.routes.refresh_seconds)
        self.routes = shared.routes
        self._shared = shared
        self._token = token

    def client(self, address: str) -> AsyncInferenceClient:
        if address not in self._clients:
            worker = copy.copy(self._shared.client(address))  # same channel and stub
            worker.token = self._token
            self._clients[address] = worker
        return self._clients[address]


class Services:
    """The clients the gateway calls the services with, per caller token."""

    def __init__(self, catalog: AsyncCatalogClient, inference: AsyncRoutedInferenceClient) -> None:
        self._catalog = catalog
        self._inference = inference

    def catalog(self, token: str | None) -> AsyncCatalogClient:
        """The catalog client, calling with `token`."""
        client = copy.copy(self._catalog)
        client.token = token
        return client

    def inference(self, token: str | None) -> AsyncRoutedInferenceClient:
        """The routed inference client, calling with `token`."""
        return _CallerRoutedClient(self._inference, self.catalog(token), token)


def caller_token(request: Request) -> str | None:
    """The bearer token of the request; None without one; 401 for a malformed header."""
    header = request.headers.get("authorization")
    if not header:
        return None
    match = _BEARER.match(header)
    if match is None:
        raise GatewayError(
            401,
            "the Authorization header must be 'Bearer <token>'",
            type="AuthenticationError",
            code="invalid_api_key",
        )
    return match.group(1)


# ------------------------------------------------------------------------------ metrics, tracing, ids


class GatewayMetrics:
    """The gateway's Prometheus registry: HTTP requests, latency, in-flight, time to first token."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{PREFIX}_http_requests_total",
            "HTTP requests answered by the gateway",
            ["handler", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time from request to the end of the response (streams included)",
            ["handler", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_http_requests_in_flight",
            "HTTP requests being answered",
            ["handler"],
            registry=self.registry,
        )
        self.first_token = Histogram(
            f"{PREFIX}_gateway_time_to_first_token_seconds",
            "Time from request to the first streamed delta",
            ["handler"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )


def _handler(path: str) -> str:
    for route in ROUTES:
        if path == route or path.startswith(route + "/"):
            return route
    return "other"


class ObserveMiddleware:
    """Pure ASGI middleware (streams stay cancellable): request id, metrics, a server span."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        given = headers.get(REQUEST_ID_HEADER, "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        handler, method = _handler(scope["path"]), scope["method"]
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        self.metrics.in_flight.labels(handler).inc()
        try:
            if tracing.enabled():
                from opentelemetry import propagate, trace

                span = tracing.tracer().start_span(
                    f"{method} {handler}",
                    context=propagate.extract(headers),
                    kind=trace.SpanKind.SERVER,
                    attributes={"http.request.method": method, "url.path": scope["path"]},
                )
                with trace.use_span(span, end_on_exit=True):
                    await self.app(scope, receive, send_with_id)
                    span.set_attribute("http.response.status_code", status)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.labels(handler).dec()
            self.metrics.requests.labels(handler, method, str(status)).inc()
            self.metrics.latency.labels(handler, method).observe(time.perf_counter() - started)
            request_id_var.reset(token)


# ------------------------------------------------------------------------------ request translation


def _sampling(body: _Sampling, *, max_tokens: int | None, logprobs: int | None) -> pb.SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return sampling_params(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        max_tokens=max_tokens,
        stop=stop,
        stop_token_ids=body.stop_token_ids,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        n=body.n,
        logprobs=logprobs,
        ignore_eos=body.ignore_eos,
    )


def _json_schema(response_format: ResponseFormat | None) -> dict[str, Any] | None:
    """The JSON schema a `response_format` asks for; None for text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    if response_format.json_schema is None or response_format.json_schema.schema_ is None:
        raise errors.bad_request(
            "response_format json_schema needs json_schema.schema", param="response_format.json_schema"
        )
    return response_format.json_schema.schema_


def _messages(messages: Sequence[ChatMessage]) -> list[pb.ChatMessage]:
    result = []
    for index, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise errors.bad_request(
                        f"content parts of type {part.type!r} are not supported; send text",
                        param=f"messages.{index}.content",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        role = "system" if message.role == "developer" else message.role
        result.append(pb.ChatMessage(role=role, content=content or ""))
    return result


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise errors.bad_request("prompt must not be empty", param="prompt")
    if all(isinstance(item, int) for item in prompt):
        return [[int(item) for item in prompt]]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def _usage(usage: pb.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _completion_logprobs(logprobs: Sequence[pb.TokenLogprob], offset: int = 0) -> dict[str, Any]:
    offsets = []
    for item in logprobs:
        offsets.append(offset)
        offset += len(item.token)
    return {
        "tokens": [item.token for item in logprobs],
        "token_logprobs": [item.logprob for item in logprobs],
        "top_logprobs": [{item.token: item.logprob} for item in logprobs],
        "text_offset": offsets,
    }


def _sse(data: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


_DONE = "data: [DONE]\n\n"
_EMPTY: Any = object()


async def _first(stream: AsyncIterator[Any]) -> Any:
    """The first item of `stream` (`_EMPTY` at once for an empty one); errors raised here."""
    return await anext(stream, _EMPTY)


async def _close(stream: AsyncIterator[Any]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


class _EventStream(StreamingResponse):
    """Server-sent events that close their gRPC stream however the response ends.

    The events' own `finally` closes it once they start; this covers a client gone
    before the first event was sent (the generator never started).
    """

    def __init__(self, events: AsyncIterator[str], stream: AsyncIterator[Any]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _close(self._stream)


# ------------------------------------------------------------------------------ the app


def create_app(
    catalog: AsyncCatalogClient,
    inference: AsyncRoutedInferenceClient,
    *,
    trust_request_chat_template: bool = False,
    request_timeout: float = 600.0,
) -> FastAPI:
    """The gateway app over `catalog` and `inference` (closed by the caller, not by the app)."""
    services = Services(catalog, inference)
    metrics = GatewayMetrics()
    app = FastAPI(title="Modelyard gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    app.add_middleware(ObserveMiddleware, metrics=metrics)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, error: GatewayError) -> JSONResponse:
        return error.response()

    @app.exception_handler(ModelyardRpcError)
    async def _rpc_error(request: Request, error: ModelyardRpcError) -> JSONResponse:
        return errors.from_rpc_error(error).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return errors.from_validation_errors(error.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "NotFoundError" if error.status_code == 404 else "BadRequestError"
        return GatewayError(error.status_code, str(error.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return errors.internal_error(error, request_id_var.get()).response()

    def model_card(model: model_pb2.Model) -> dict[str, Any]:
        name = model.name.removeprefix("models/")
        card: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": model.create_time.seconds,
            "owned_by": "modelyard",
            "root": name,
            "parent": None,
        }
        if model.llm.HasField("context_length"):
            card["max_model_len"] = model.llm.context_length
        if model.llm.HasField("adapter"):
            base = model.llm.adapter.base_model or model.parent
            card["parent"] = base.removeprefix("models/") if base else None
        return card

    def servable(model: model_pb2.Model) -> bool:
        return model.state == model_pb2.MODEL_STATE_READY and model.kind == model_pb2.MODEL_KIND_LLM

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        client = services.catalog(caller_token(request))
        cards = [model_card(model) async for model in client.list_models() if servable(model)]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> dict[str, Any]:
        found = await services.catalog(caller_token(request)).get_model(model_name(model))
        if not servable(found):
            raise GatewayError(
                404, f"model {model!r} cannot serve text", type="NotFoundError", code="model_not_found"
            )
        return model_card(found)

    def streamed(
        request: Request,
        handler: str,
        head: Any,
        stream: AsyncIterator[Any],
        chunks: Any,
        started: float,
    ) -> StreamingResponse:
        """The SSE response of a stream whose first item (`head`) has arrived."""

        async def events() -> AsyncIterator[str]:
            metrics.first_token.labels(handler).observe(time.perf_counter() - started)
            try:
                if head is not _EMPTY:
                    for event in chunks(head):
                        yield event
                    async for item in stream:
                        for event in chunks(item):
                            yield event
            except ModelyardRpcError as error:  # after the first delta: the status is sent already
                yield _sse(errors.from_rpc_error(error).body())
            finally:
                await _close(stream)  # cancels the RPC when the client went away
            for event in chunks(None):
                yield event
            yield _DONE

        return _EventStream(events(), stream)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        started = time.perf_counter()
        if body.echo:
            raise errors.bad_request("echo is not supported", param="echo")
        if body.suffix:
            raise errors.bad_request("suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise errors.bad_request("best_of other than n is not supported", param="best_of")
        prompts = _prompts(body.prompt)
        sampling = _sampling(body, max_tokens=body.max_tokens, logprobs=body.logprobs)
        schema = _json_schema(body.response_format)
        client = services.inference(caller_token(request))
        request_id = request.state.request_id
        completion_id = f"cmpl-{request_id}"
        created = int(time.time())
        n = body.n or 1
        if not body.stream:
            calls = [
                client.generate(
                    body.model,
                    prompt,
                    sampling=sampling,
                    json_schema=schema,
                    timeout=request_timeout,
                )
                for prompt in prompts
            ]
            replies = await asyncio.gather(*calls)
            choices = []
            total = pb.Usage()
            for number, reply in enumerate(replies):
                for completion in reply.completions:
                    choices.append(
                        {
                            "index": number * n + completion.index,
                            "text": completion.text,
                            "logprobs": _completion_logprobs(completion.logprobs)
                            if body.logprobs is not None
                            else None,
                            "finish_reason": _FINISH.get(completion.finish_reason),
                        }
                    )
                total.prompt_tokens += reply.usage.prompt_tokens
                total.completion_tokens += reply.usage.completion_tokens
                total.total_tokens += reply.usage.total_tokens
            return {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": choices,
                "usage": _usage(total),
            }
        if len(prompts) != 1:
            raise errors.bad_request("a streamed completion takes one prompt", param="prompt")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = client.stream_generate(body.model, prompts[0], sampling=sampling, json_schema=schema)
        head = await _first(stream)
        offsets = [0] * n
        usage: list[pb.Usage] = []

        def chunk(choices: list[dict[str, Any]]) -> str:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": choices,
            }
            if include_usage:
                data["usage"] = None
            return _sse(data)

        def chunks(delta: pb.StreamGenerateResponse | None) -> list[str]:
            if delta is None:  # the end
                if include_usage and usage:
                    return [
                        _sse(
                            {
                                "id": completion_id,
                                "object": "text_completion",
                                "created": created,
                                "model": body.model,
                                "choices": [],
                                "usage": _usage(usage[-1]),
                            }
                        )
                    ]
                return []
            if delta.HasField("usage"):
                usage.append(delta.usage)
            if not delta.text and not delta.token_ids and not delta.finish_reason:
                return []
            logprobs = None
            if body.logprobs is not None and delta.index < n:
                logprobs = _completion_logprobs(delta.logprobs, offsets[delta.index])
                offsets[delta.index] += len(delta.text)
            choice = {
                "index": delta.index,
                "text": delta.text,
                "logprobs": logprobs,
                "finish_reason": _FINISH.get(delta.finish_reason),
            }
            return [chunk([choice])]

        return streamed(request, "/v1/completions", head, stream, chunks, started)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        started = time.perf_counter()
        if body.tools:
            raise errors.bad_request("tools are not supported", param="tools")
        if body.logprobs:
            raise errors.bad_request("logprobs are not available for chat completions", param="logprobs")
        if body.chat_template is not None and not trust_request_chat_template:
            raise errors.bad_request(
                "chat templates sent in requests are not accepted by this server "
                "(MODELYARD_GATEWAY_TRUST_REQUEST_CHAT_TEMPLATE); the model's own template is used "
                "without one",
                param="chat_template",
            )
        if not body.messages:
            raise errors.bad_request("messages must not be empty", param="messages")
        messages = _messages(body.messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        sampling = _sampling(body, max_tokens=max_tokens, logprobs=None)
        schema = _json_schema(body.response_format)
        client = services.inference(caller_token(request))
        request_id = request.state.request_id
        completion_id = f"chatcmpl-{request_id}"
        created = int(time.time())
        if not body.stream:
            reply = await client.chat(
                body.model, messages, sampling=sampling, json_schema=schema,
                chat_template=body.chat_template, timeout=request_timeout,
            )  # fmt: skip
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {
                        "index": choice.index,
                        "message": {"role": "assistant", "content": choice.message.content},
                        "logprobs": None,
                        "finish_reason": _FINISH.get(choice.finish_reason),
                    }
                    for choice in reply.choices
                ],
                "usage": _usage(reply.usage),
            }
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = client.stream_chat(
            body.model, messages, sampling=sampling, json_schema=schema,
            chat_template=body.chat_template,
        )  # fmt: skip
        head = await _first(stream)
        started_choices: set[int] = set()
        usage: list[pb.Usage] = []

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": choices,
            }
            if include_usage:
                data["usage"] = None
            data.update(extra)
            return _sse(data)

        def chunks(delta: pb.StreamChatResponse | None) -> list[str]:
            if delta is None:  # the end
                if include_usage and usage:
                    return [chunk([], usage=_usage(usage[-1]))]
                return []
            if delta.HasField("usage"):
                usage.append(delta.usage)
            events = []
            if delta.index not in started_choices:
                started_choices.add(delta.index)
                role = {"index": delta.index, "delta": {"role": "assistant", "content": ""}}
                events.append(chunk([{**role, "logprobs": None, "finish_reason": None}]))
            if delta.content or delta.finish_reason:
                content = {"content": delta.content} if delta.content else {}
                choice = {
                    "index": delta.index,
                    "delta": content,
                    "logprobs": None,
                    "finish_reason": _FINISH.get(delta.finish_reason),
                }
                events.append(chunk([choice]))
            return events

        return streamed(request, "/v1/chat/completions", head, stream, chunks, started)

    @app.post("/v1/embeddings", response_model=None)
    async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if not inputs:
            raise errors.bad_request("input must not be empty", param="input")
        if not all(isinstance(item, str) for item in inputs):
            raise errors.bad_request("token ids as input are not supported; send text", param="input")
        if body.dimensions is not None:
            raise errors.bad_request("dimensions is not supported", param="dimensions")
        client = services.inference(caller_token(request))
        reply = await client.embed(
            body.model,
            [str(item) for item in inputs],
            normalize=body.normalize,
            timeout=request_timeout,
        )

        def encoded(values: Sequence[float]) -> list[float] | str:
            if body.encoding_format == "base64":  # little-endian float32, as OpenAI sends it
                return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
            return list(values)

        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": item.index, "embedding": encoded(item.values)}
                for item in reply.embeddings
            ],
            "model": body.model,
            "usage": {"prompt_tokens": reply.usage.prompt_tokens, "total_tokens": reply.usage.prompt_tokens},
        }

    return app
