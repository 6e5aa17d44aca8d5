"""Typed clients of `modelyard.inference.v1.InferenceService` (sync and asyncio).

Sampling parameters are keyword arguments named like the fields of
`SamplingParams` (`max_tokens=`, `temperature=`, `top_p=`, `seed=`, `stop=`,
...); `None` leaves a field unset so the model's or engine's default applies.
Streams are iterators: leaving the loop early (or closing the iterator)
cancels the RPC, which aborts the request in the engine.

`InferenceClient.for_model(model, catalog=...)` asks the catalog which worker
can run the model (`FindWorkers`) and connects to the best one; see
`clients.routing` for a client that also fails over to the next worker.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, TypedDict, TypeVar, Unpack

from clients.base import AsyncClient, SyncClient
from clients.catalog import AsyncCatalogClient, CatalogClient, model_name
from modelyard.catalog.v1 import worker_pb2
from modelyard.inference.v1 import inference_service_pb2 as pb
from modelyard.inference.v1 import inference_service_pb2_grpc as pb_grpc

SERVICE = "modelyard.inference.v1.InferenceService"
DEFAULT_ADDRESS = "localhost:50053"
LOAD_TIMEOUT = 600.0

ChatMessageLike = pb.ChatMessage | Mapping[str, str] | tuple[str, str]
"""A chat message: a `ChatMessage`, a `{"role": ..., "content": ...}` dict or a `(role, content)` pair."""

Prompt = str | Sequence[int]
"""A prompt: text, or token ids."""


class SamplingOptions(TypedDict, total=False):
    """Keyword arguments that set `SamplingParams` fields; `None` leaves a field unset."""

    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    max_tokens: int | None
    stop: Sequence[str] | None
    stop_token_ids: Sequence[int] | None
    seed: int | None
    presence_penalty: float | None
    frequency_penalty: float | None
    repetition_penalty: float | None
    n: int | None
    logprobs: int | None
    ignore_eos: bool | None


SAMPLING_FIELDS = frozenset(field.name for field in pb.SamplingParams.DESCRIPTOR.fields)


def sampling_params(base: pb.SamplingParams | None = None, **options: Any) -> pb.SamplingParams:
    """`SamplingParams` from `base` (copied) with the non-None `options` set on top.

    Raises TypeError for a name that is not a field of `SamplingParams`.
    """
    params = pb.SamplingParams()
    if base is not None:
        params.CopyFrom(base)
    for key, value in options.items():
        if key not in SAMPLING_FIELDS:
            raise TypeError(
                f"unknown sampling parameter {key!r}; known: {', '.join(sorted(SAMPLING_FIELDS))}"
            )
        if value is None:
            continue
        if key in ("stop", "stop_token_ids"):
            target = getattr(params, key)
            del target[:]
            target.extend(value)
        else:
            setattr(params, key, value)
    return params


def structured_output(
    *,
    json_schema: str | Mapping[str, Any] | None = None,
    regex: str | None = None,
    choices: Sequence[str] | None = None,
) -> pb.StructuredOutput | None:
    """A `StructuredOutput` from at most one constraint; None when none is given."""
    given = [
        name
        for name, value in (("json_schema", json_schema), ("regex", regex), ("choices", choices))
        if value
    ]
    if len(given) > 1:
        raise ValueError(f"give at most one output constraint, not {' and '.join(given)}")
    if json_schema:
        text = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        return pb.StructuredOutput(json_schema=text)
    if regex:
        return pb.StructuredOutput(regex=regex)
    if choices:
        return pb.StructuredOutput(choice=pb.Choices(choices=list(choices)))
    return None


def chat_message(message: ChatMessageLike) -> pb.ChatMessage:
    """Coerce a dict, a (role, content) pair or a `ChatMessage` to a `ChatMessage`."""
    if isinstance(message, pb.ChatMessage):
        return message
    if isinstance(message, tuple):
        role, content = message
        return pb.ChatMessage(role=role, content=content)
    unknown = set(message) - {"role", "content"}
    if unknown:
        raise ValueError(f"a chat message has `role` and `content`, not {', '.join(sorted(unknown))}")
    return pb.ChatMessage(role=message.get("role", ""), content=message.get("content", ""))


GenerateLike = TypeVar("GenerateLike", pb.GenerateRequest, pb.StreamGenerateRequest)
ChatLike = TypeVar("ChatLike", pb.ChatRequest, pb.StreamChatRequest)


class _Requests:
    """Request builders shared by the sync and asyncio clients (and the routed ones)."""

    @staticmethod
    def generate(
        request: GenerateLike,
        model: str,
        prompt: Prompt,
        *,
        adapter: str | None,
        sampling: pb.SamplingParams | None,
        output: pb.StructuredOutput | None,
        request_id: str | None,
        options: Mapping[str, Any],
    ) -> GenerateLike:
        request.model = model_name(model)
        if adapter:
            request.adapter = model_name(adapter)
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_token_ids.ids.extend(prompt)
        request.sampling.CopyFrom(sampling_params(sampling, **options))
        if output is not None:
            request.structured_output.CopyFrom(output)
        if request_id:
            request.request_id = request_id
        return request

    @staticmethod
    def chat(
        request: ChatLike,
        model: str,
        messages: Sequence[ChatMessageLike],
        *,
        adapter: str | None,
        sampling: pb.SamplingParams | None,
        output: pb.StructuredOutput | None,
        chat_template: str | None,
        request_id: str | None,
        options: Mapping[str, Any],
    ) -> ChatLike:
        request.model = model_name(model)
        if adapter:
            request.adapter = model_name(adapter)
        request.messages.extend(chat_message(message) for message in messages)
        request.sampling.CopyFrom(sampling_params(sampling, **options))
        if output is not None:
            request.structured_output.CopyFrom(output)
        if chat_template is not None:
            request.chat_template = chat_template
        if request_id:
            request.request_id = request_id
        return request

    @staticmethod
    def image(
        model: str, prompt: str, *, adapter: str | None, options: Mapping[str, Any]
    ) -> pb.GenerateImageRequest:
        request = pb.GenerateImageRequest(model=model_name(model), prompt=prompt)
        if adapter:
            request.adapter = model_name(adapter)
        for key, value in options.items():
            if value is not None:
                setattr(request, key, value)
        return request

    @staticmethod
    def embed(
        model: str, inputs: Sequence[str], *, normalize: bool | None, request_id: str | None
    ) -> pb.EmbedRequest:
        if isinstance(inputs, str):
            inputs = [inputs]
        request = pb.EmbedRequest(model=model_name(model), inputs=list(inputs))
        if normalize is not None:
            request.normalize = normalize
        if request_id:
            request.request_id = request_id
        return request

    @staticmethod
    def load(model: str, max_model_len: int | None) -> pb.LoadModelRequest:
        request = pb.LoadModelRequest(model=model_name(model))
        if max_model_len is not None:
            request.max_model_len = max_model_len
        return request


class ImageOptions(TypedDict, total=False):
    """Keyword arguments that set `GenerateImageRequest` fields; `None` leaves a field unset."""

    negative_prompt: str | None
    adapter_scale: float | None
    steps: int | None
    cfg_scale: float | None
    sampler: str | None
    seed: int | None
    width: int | None
    height: int | None
    clip_skip: int | None
    request_id: str | None


class InferenceClient(SyncClient):
    """Blocking client of one inference server.

    ```python
    with InferenceClient("localhost:50053") as client:
        reply = client.generate("tiny-llama", "Hello", max_tokens=16, temperature=0)
        print(reply.completions[0].text)
    ```
    """

    SERVICE = SERVICE
    STUB = pb_grpc.InferenceServiceStub

    worker: worker_pb2.Worker | None = None
    """The catalog's description of the worker, when the client came from `for_model`."""

    @classmethod
    def for_model(
        cls,
        model: str,
        *,
        catalog: CatalogClient | str,
        role: worker_pb2.WorkerRole.ValueType = worker_pb2.WORKER_ROLE_INFERENCE,
        **client_kwargs: Any,
    ) -> InferenceClient:
        """A client connected to the best worker the catalog finds for `model`.

        `model` is the model to route by (for generation with a LoRA adapter,
        route by the adapter: its rules include the base's). `catalog` is a
        `CatalogClient` or an address (a temporary client with the same `token`
        and `tls` as `client_kwargs`). Raises `NoCompatibleWorker` (a
        `ModelyardRpcError`, FAILED_PRECONDITION, reason NO_COMPATIBLE_WORKER)
        listing each rejected worker and why.
        """
        from clients.routing import ranked_matches

        if isinstance(catalog, str):
            with CatalogClient(
                catalog, token=client_kwargs.get("token"), tls=client_kwargs.get("tls")
            ) as temporary:
                matches = ranked_matches(temporary.find_workers(model, role), model, role)
        else:
            matches = ranked_matches(catalog.find_workers(model, role), model, role)
        client = cls(matches[0].worker.address, **client_kwargs)
        client.worker = matches[0].worker
        return client

    def generate(
        self,
        model: str,
        prompt: Prompt,
        *,
        adapter: str | None = None,
        sampling: pb.SamplingParams | None = None,
        json_schema: str | Mapping[str, Any] | None = None,
        regex: str | None = None,
        choices: Sequence[str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[SamplingOptions],
    ) -> pb.GenerateResponse:
        """Generate completions for `prompt` (text or token ids)."""
        output = structured_output(json_schema=json_schema, regex=regex, choices=choices)
        request = _Requests.generate(
            pb.GenerateRequest(), model, prompt, adapter=adapter, sampling=sampling,
            output=output, request_id=request_id, options=options,
        )  # fmt: skip
        return self.call("Generate", request, timeout=timeout)

    def stream_generate(
        self,
        model: str,
        prompt: Prompt,
        *,
        adapter: str | None = None,
        sampling: pb.SamplingParams | None = None,
        json_schema: str | Mapping[str, Any] | None = None,
        regex: str | None = None,
        choices: Sequence[str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[SamplingOptions],
    ) -> Iterator[pb.StreamGenerateResponse]:
        """Stream text deltas as they are produced; breaking out of the loop cancels the request."""
        output = structured_output(json_schema=json_schema, regex=regex, choices=choices)
        request = _Requests.generate(
            pb.StreamGenerateRequest(), model, prompt, adapter=adapter, sampling=sampling,
            output=output, request_id=request_id, options=options,
        )  # fmt: skip
        return self.stream("StreamGenerate", request, timeout=timeout)

    def chat(
        self,
        model: str,
        messages: Sequence[ChatMessageLike],
        *,
        adapter: str | None = None,
        sampling: pb.SamplingParams | None = None,
        json_schema: str | Mapping[str, Any] | None = None,
        regex: str | None = None,
        choices: Sequence[str] | None = None,
        chat_template: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[SamplingOptions],
    ) -> pb.ChatResponse:
        """Answer a conversation rendered with the model's chat template (or `chat_template`)."""
        output = structured_output(json_schema=json_schema, regex=regex, choices=choices)
        request = _Requests.chat(
            pb.ChatRequest(), model, messages, adapter=adapter, sampling=sampling, output=output,
            chat_template=chat_template, request_id=request_id, options=options,
        )  # fmt: skip
        return self.call("Chat", request, timeout=timeout)

    def stream_chat(
        self,
        model: str,
        messages: Sequence[ChatMessageLike],
        *,
        adapter: str | None = None,
        sampling: pb.SamplingParams | None = None,
        json_schema: str | Mapping[str, Any] | None = None,
        regex: str | None = None,
        choices: Sequence[str] | None = None,
        chat_template: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[SamplingOptions],
    ) -> Iterator[pb.StreamChatResponse]:
        """Stream an answer's content deltas; breaking out of the loop cancels the request."""
        output = structured_output(json_schema=json_schema, regex=regex, choices=choices)
        request = _Requests.chat(
            pb.StreamChatRequest(), model, messages, adapter=adapter, sampling=sampling, output=output,
            chat_template=chat_template, request_id=request_id, options=options,
        )  # fmt: skip
        return self.stream("StreamChat", request, timeout=timeout)

    def embed(
        self,
        model: str,
        inputs: Sequence[str],
        *,
        normalize: bool | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.EmbedResponse:
        """One vector per input text (`.embeddings[i].values`); an adapter id runs on its base."""
        request = _Requests.embed(model, inputs, normalize=normalize, request_id=request_id)
        return self.call("Embed", request, timeout=timeout)

    def generate_image(
        self,
        model: str,
        prompt: str,
        *,
        adapter: str | None = None,
        timeout: float | None = None,
        **options: Unpack[ImageOptions],
    ) -> pb.GenerateImageResponse:
        """Generate one image (PNG bytes in `.image`, the parameters used in `.parameters`).

        `adapter` is an image LoRA (catalog id) of the model's base family; unset options take
        the defaults of the model's `ImageConfig`, else the pipeline's.
        """
        request = _Requests.image(model, prompt, adapter=adapter, options=options)
        return self.call("GenerateImage", request, timeout=timeout)

    def load_model(
        self, model: str, *, max_model_len: int | None = None, timeout: float | None = LOAD_TIMEOUT
    ) -> pb.LoadedModel:
        """Load a catalog model, or hot-load a LoRA adapter onto its loaded base."""
        return self.call(
            "LoadModel", _Requests.load(model, max_model_len), lambda r: r.loaded_model, timeout=timeout
        )

    def unload_model(self, model: str, *, timeout: float | None = None) -> None:
        """Unload a model (with its adapters) or one adapter."""
        self.call("UnloadModel", pb.UnloadModelRequest(model=model_name(model)), timeout=timeout)

    def list_loaded_models(self) -> list[pb.LoadedModel]:
        """The models loaded on this server, with their state and adapters."""
        return self.call("ListLoadedModels", pb.ListLoadedModelsRequest(), lambda r: list(r.loaded_models))

    def get_server_info(self) -> pb.GetServerInfoResponse:
        """Engine, version, device, capabilities and loaded models of this server."""
        return self.call("GetServerInfo", pb.GetServerInfoRequest())


class AsyncInferenceClient(AsyncClient):
    """asyncio client of one inference server (same methods as `InferenceClient`, awaited)."""

    SERVICE = SERVICE
    STUB = pb_grpc.InferenceServiceStub

    worker: worker_pb2.Worker | None = None
    """The catalog's description of the worker, when the client came from `for_model`."""

    @classmethod
    async def for_model(
        cls,
        model: str,
        *,
        catalog: AsyncCatalogClient | str,
        role: worker_pb2.WorkerRole.ValueType = worker_pb2.WORKER_ROLE_INFERENCE,
        **client_kwargs: Any,
    ) -> AsyncInferenceClient:
        """A client connected to the best worker the catalog finds for `model` (see `InferenceClient`)."""
        from clients.routing import ranked_matches

        if isinstance(catalog, str):
            async with AsyncCatalogClient(
                catalog, token=client_kwargs.get("token"), tls=client_kwargs.get("tls")
            ) as temporary:
                matches = ranked_matches(await temporary.find_workers(model, role), model, role)
        else:
            matches = ranked_matches(await catalog.find_workers(model, role), model, role)
        client = cls(matches[0].worker.address, **client_kwargs)
        client.worker = matches[0].worker
        return client

    async def generate(
        self,
        model: str,
        prompt: Prompt,
        *,
        adapter: str | None = None,
        sampling: pb.SamplingParams | None = None,
        json_schema: str | Mapping[str, Any] | None = None,
        regex: str | None = None,
        choices: Sequence[str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[SamplingOptions],
    ) -> pb.GenerateResponse:
        """Generate completions for `prompt` (text or token ids)."""
        output = structured_output(json_schema=json_schema, regex=regex, choices=choices)
        request = _Requests.generate(
            pb.GenerateRequest(), model, prompt, adapter=adapter, sampling=sampling,
            output=output, request_id=request_id, options=options,
        )  # fmt: skip
        return await self.call("Generate", request, timeout=timeout)

    def stream_generate(
        self,
        model: str,
        prompt: Prompt,
        *,
        adapter: str | None = None,
        sampling: pb.SamplingParams | None = None,
        json_schema: str | Mapping[str, Any] | None = None,
        regex: str | None = None,
        choices: Sequence[str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[SamplingOptions],
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        """Stream text deltas (`async for`); leaving the loop early cancels the request."""
        output = structured_output(json_schema=json_schema, regex=regex, choices=choices)
        request = _Requests.generate(
            pb.StreamGenerateRequest(), model, prompt, adapter=adapter, sampling=sampling,
            output=output, request_id=request_id, options=options,
        )  # fmt: skip
        return self.stream("StreamGenerate", request, timeout=timeout)

    async def chat(
        self,
        model: str,
        messages: Sequence[ChatMessageLike],
        *,
        adapter: str | None = None,
        sampling: pb.SamplingParams | None = None,
        json_schema: str | Mapping[str, Any] | None = None,
        regex: str | None = None,
        choices: Sequence[str] | None = None,
        chat_template: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[SamplingOptions],
    ) -> pb.ChatResponse:
        """Answer a conversation rendered with the model's chat template (or `chat_template`)."""
        output = structured_output(json_schema=json_schema, regex=regex, choices=choices)
        request = _Requests.chat(
            pb.ChatRequest(), model, messages, adapter=adapter, sampling=sampling, output=output,
            chat_template=chat_template, request_id=request_id, options=options,
        )  # fmt: skip
        return await self.call("Chat", request, timeout=timeout)

    def stream_chat(
        self,
        model: str,
        messages: Sequence[ChatMessageLike],
        *,
        adapter: str | None = None,
        sampling: pb.SamplingParams | None = None,
        json_schema: str | Mapping[str, Any] | None = None,
        regex: str | None = None,
        choices: Sequence[str] | None = None,
        chat_template: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[SamplingOptions],
    ) -> AsyncIterator[pb.StreamChatResponse]:
        """Stream an answer's content deltas (`async for`); leaving the loop early cancels it."""
        output = structured_output(json_schema=json_schema, regex=regex, choices=choices)
        request = _Requests.chat(
            pb.StreamChatRequest(), model, messages, adapter=adapter, sampling=sampling, output=output,
            chat_template=chat_template, request_id=request_id, options=options,
        )  # fmt: skip
        return self.stream("StreamChat", request, timeout=timeout)

    async def embed(
        self,
        model: str,
        inputs: Sequence[str],
        *,
        normalize: bool | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.EmbedResponse:
        """One vector per input text (see `InferenceClient.embed`)."""
        request = _Requests.embed(model, inputs, normalize=normalize, request_id=request_id)
        return await self.call("Embed", request, timeout=timeout)

    async def generate_image(
        self,
        model: str,
        prompt: str,
        *,
        adapter: str | None = None,
        timeout: float | None = None,
        **options: Unpack[ImageOptions],
    ) -> pb.GenerateImageResponse:
        """Generate one image (see `InferenceClient.generate_image`)."""
        request = _Requests.image(model, prompt, adapter=adapter, options=options)
        return await self.call("GenerateImage", request, timeout=timeout)

    async def load_model(
        self, model: str, *, max_model_len: int | None = None, timeout: float | None = LOAD_TIMEOUT
    ) -> pb.LoadedModel:
        """Load a catalog model, or hot-load a LoRA adapter onto its loaded base."""
        return await self.call(
            "LoadModel", _Requests.load(model, max_model_len), lambda r: r.loaded_model, timeout=timeout
        )

    async def unload_model(self, model: str, *, timeout: float | None = None) -> None:
        """Unload a model (with its adapters) or one adapter."""
        await self.call("UnloadModel", pb.UnloadModelRequest(model=model_name(model)), timeout=timeout)

    async def list_loaded_models(self) -> list[pb.LoadedModel]:
        """The models loaded on this server, with their state and adapters."""
        return await self.call(
            "ListLoadedModels", pb.ListLoadedModelsRequest(), lambda r: list(r.loaded_models)
        )

    async def get_server_info(self) -> pb.GetServerInfoResponse:
        """Engine, version, device, capabilities and loaded models of this server."""
        return await self.call("GetServerInfo", pb.GetServerInfoRequest())
