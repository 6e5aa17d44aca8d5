"""The gateway's FastAPI app: OpenAI's routes on top of the typed asyncio clients.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`,
`POST /v1/embeddings`, `GET /health`, `GET /metrics`.

`create_app(catalog, inference)` takes an `AsyncCatalogClient` and an
`AsyncRoutedInferenceClient` (routing, fail-over and the route cache are theirs). Each
route parses, calls, translates: `gateway.translate` turns OpenAI's JSON into the protos
and back, `gateway.callers` gives each request per-caller copies of the clients that
carry the caller's `Authorization: Bearer` token (so the services' role table answers
401/403), `gateway.streaming` answers streams as server-sent events ending in
`data: [DONE]`, and `gateway.metrics` counts and times every request. The first delta of a
stream is awaited before the response starts, so a request that fails before generating
gets its real HTTP status. A client that disconnects cancels the gRPC stream, which
aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from clients.catalog import AsyncCatalogClient, model_name
from clients.errors import ModelyardRpcError
from clients.routing import AsyncRoutedInferenceClient
from gateway import errors, translate
from gateway.callers import Services, caller_token
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics, ObserveMiddleware
from gateway.openai_types import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from gateway.streaming import event_stream, first
from server_kit.logs import request_id_var


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

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        client = services.catalog(caller_token(request))
        cards = [
            translate.model_card(model) async for model in client.list_models() if translate.servable(model)
        ]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> dict[str, Any]:
        found = await services.catalog(caller_token(request)).get_model(model_name(model))
        if not translate.servable(found):
            raise GatewayError(
                404, f"model {model!r} cannot serve text", type="NotFoundError", code="model_not_found"
            )
        return translate.model_card(found)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        started = time.perf_counter()
        prompts = translate.prompts(body)
        sampling = translate.sampling(body)
        schema = translate.json_schema(body.response_format)
        client = services.inference(caller_token(request))
        completion_id, created = f"cmpl-{request.state.request_id}", int(time.time())
        if not body.stream:
            calls = [
                client.generate(
                    body.model, prompt, sampling=sampling, json_schema=schema, timeout=request_timeout
                )
                for prompt in prompts
            ]
            replies = await asyncio.gather(*calls)
            return translate.completion(replies, body, completion_id, created)
        if len(prompts) != 1:
            raise errors.bad_request("a streamed completion takes one prompt", param="prompt")
        stream = client.stream_generate(body.model, prompts[0], sampling=sampling, json_schema=schema)
        head = await first(stream)
        chunks = translate.CompletionChunks(body, completion_id, created)
        first_token = partial(metrics.observe_first_token, "/v1/completions", started)
        return event_stream(head, stream, chunks, on_start=first_token)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        started = time.perf_counter()
        messages = translate.messages(body, trust_request_chat_template=trust_request_chat_template)
        sampling = translate.sampling(body)
        schema = translate.json_schema(body.response_format)
        client = services.inference(caller_token(request))
        completion_id, created = f"chatcmpl-{request.state.request_id}", int(time.time())
        if not body.stream:
            reply = await client.chat(
                body.model, messages, sampling=sampling, json_schema=schema,
                chat_template=body.chat_template, timeout=request_timeout,
            )  # fmt: skip
            return translate.chat_completion(reply, body.model, completion_id, created)
        stream = client.stream_chat(
            body.model, messages, sampling=sampling, json_schema=schema,
            chat_template=body.chat_template,
        )  # fmt: skip
        head = await first(stream)
        chunks = translate.ChatChunks(body, completion_id, created)
        first_token = partial(metrics.observe_first_token, "/v1/chat/completions", started)
        return event_stream(head, stream, chunks, on_start=first_token)

    @app.post("/v1/embeddings", response_model=None)
    async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
        inputs = translate.embedding_inputs(body)
        client = services.inference(caller_token(request))
        reply = await client.embed(body.model, inputs, normalize=body.normalize, timeout=request_timeout)
        return translate.embeddings(reply, body)

    return app
