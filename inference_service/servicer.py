"""InferenceService servicer: translates protos to engine requests and back, nothing else."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import timestamp_pb2
from grpc import aio

from inference_service.chat import RenderBudget, render_and_encode
from inference_service.engines.base import (
    Engine,
    EngineDelta,
    EngineRequest,
    FinishReason,
    SamplingSpec,
    StructuredOutputSpec,
    collect,
)
from inference_service.engines.image_base import ImageRequest, ImageResult
from inference_service.metrics import InferenceMetrics
from inference_service.models import LoadedImageModel, LoadedModel, ModelManager
from modelyard.inference.v1 import inference_service_pb2 as pb
from modelyard.inference.v1 import inference_service_pb2_grpc as pb_grpc
from server_kit.errors import FieldViolation, InvalidArgument

MAX_EMBED_INPUTS = 2048
"""Most inputs one Embed request may carry (OpenAI's limit)."""

_FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}

_SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "max_tokens", "seed", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "n", "logprobs", "ignore_eos",
)  # fmt: skip


def sampling_spec(params: pb.SamplingParams) -> SamplingSpec:
    """proto SamplingParams -> SamplingSpec (unset optional fields stay None)."""
    # ListFields gives the optional fields that are set (zero values included).
    values: dict[str, Any] = {f.name: v for f, v in params.ListFields() if f.name in _SAMPLING_FIELDS}
    return SamplingSpec(stop=tuple(params.stop), stop_token_ids=tuple(params.stop_token_ids), **values)


def structured_spec(message: pb.StructuredOutput) -> StructuredOutputSpec | None:
    """proto StructuredOutput -> StructuredOutputSpec (None when no constraint)."""
    kind = message.WhichOneof("constraint")
    if kind == "json_schema":
        return StructuredOutputSpec(json_schema=message.json_schema)
    if kind == "regex":
        return StructuredOutputSpec(regex=message.regex)
    if kind == "choice":
        return StructuredOutputSpec(choice=tuple(message.choice.choices))
    return None


def loaded_model_proto(loaded: LoadedModel | LoadedImageModel) -> pb.LoadedModel:
    """LoadedModel or LoadedImageModel (domain) -> proto."""
    load_time = timestamp_pb2.Timestamp()
    load_time.FromNanoseconds(int(loaded.load_time * 1e9))
    return pb.LoadedModel(
        model=loaded.model.name,
        engine=loaded.engine.name,
        state=pb.LOADED_MODEL_STATE_READY,
        adapters=list(loaded.adapters),
        max_model_len=loaded.engine.max_model_len if isinstance(loaded, LoadedModel) else 0,
        load_time=load_time,
    )


def _all_loaded(manager: ModelManager) -> list[LoadedModel | LoadedImageModel]:
    return [*manager.loaded(), *manager.loaded_images(), *manager.embedders()]


def image_request(request: pb.GenerateImageRequest, adapter_id: str | None) -> ImageRequest:
    """proto GenerateImageRequest -> ImageRequest (unset optional fields stay None)."""

    # ListFields gives the optional fields that are set (zero values included).
    given = {f.name: v for f, v in request.ListFields()}.get
    return ImageRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        steps=given("steps"),
        cfg_scale=given("cfg_scale"),
        sampler=request.sampler or None,
        seed=given("seed"),
        width=given("width"),
        height=given("height"),
        clip_skip=given("clip_skip"),
        adapter_id=adapter_id,
        adapter_scale=given("adapter_scale"),
    )


def image_response(request_id: str, model: str, result: ImageResult) -> pb.GenerateImageResponse:
    """ImageResult -> proto GenerateImageResponse."""
    used = result.parameters
    return pb.GenerateImageResponse(
        request_id=request_id,
        model=model,
        image=result.png,
        mime_type=result.mime_type,
        parameters=pb.ImageParameters(
            adapter=used.adapter_id or "",
            adapter_scale=used.adapter_scale,
            steps=used.steps,
            cfg_scale=used.cfg_scale,
            sampler=used.sampler,
            seed=used.seed,
            width=used.width,
            height=used.height,
            clip_skip=used.clip_skip,
        ),
    )


def _usage(delta_usage: Any) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=delta_usage.prompt_tokens,
        completion_tokens=delta_usage.completion_tokens,
        total_tokens=delta_usage.total_tokens,
    )


def _logprobs(delta: Any) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, token=lp.token) for lp in delta]


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """The gRPC face of `ModelManager` and its engines."""

    def __init__(
        self,
        manager: ModelManager,
        server_info: pb.GetServerInfoResponse,
        metrics: InferenceMetrics | None = None,
    ) -> None:
        self.manager = manager
        self.server_info = server_info
        self.metrics = metrics

    def _generate(self, loaded: LoadedModel, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        """The engine's stream for `request`, counted in the metrics when there are any."""
        deltas = loaded.engine.generate(request)
        return deltas if self.metrics is None else self.metrics.observe(loaded.model.name, deltas)

    async def _prepare(
        self,
        model: str,
        adapter: str,
        sampling: pb.SamplingParams,
        structured: pb.StructuredOutput,
        request_id: str,
        *,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        add_special_tokens: bool = True,
    ) -> tuple[LoadedModel, EngineRequest]:
        loaded, adapter_id = await self.manager.target(model, adapter)
        if prompt_token_ids is None and isinstance(loaded.engine, Engine):
            # A text prompt (up to the largest gRPC message) is tokenized on a worker
            # thread, not on the event loop.
            prompt_token_ids = await asyncio.to_thread(
                loaded.engine.tokenizer.encode, prompt or "", add_special_tokens=add_special_tokens
            )
        # The engine validates the request (sampling ranges, prompt ids, context length)
        # when its stream starts: not done twice here.
        request = EngineRequest(
            request_id=request_id or uuid.uuid4().hex,
            prompt=(prompt or "") if prompt_token_ids is None else None,
            prompt_token_ids=prompt_token_ids,
            sampling=loaded.defaults.apply(sampling_spec(sampling)),
            adapter_id=adapter_id,
            structured_output=structured_spec(structured),
            add_special_tokens=add_special_tokens,
        )
        return loaded, request

    async def _generate_request(
        self, request: pb.GenerateRequest | pb.StreamGenerateRequest
    ) -> tuple[LoadedModel, EngineRequest]:
        ids = (
            list(request.prompt_token_ids.ids) if request.WhichOneof("input") == "prompt_token_ids" else None
        )
        return await self._prepare(
            request.model,
            request.adapter,
            request.sampling,
            request.structured_output,
            request.request_id,
            prompt=request.prompt,
            prompt_token_ids=ids,
        )

    async def _chat_request(
        self, request: pb.ChatRequest | pb.StreamChatRequest
    ) -> tuple[LoadedModel, EngineRequest]:
        loaded, _ = await self.manager.target(request.model, request.adapter)
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        template = request.chat_template if request.HasField("chat_template") else None
        if template is None and loaded.model.llm.tokenizer.HasField("chat_template"):
            template = loaded.model.llm.tokenizer.chat_template  # the one recorded in the catalog
        # The template is code: rendered (and the prompt tokenized) on a worker thread
        # within a size and time budget, so the event loop keeps serving (GetServerInfo,
        # health) while it runs.
        engine = loaded.engine
        ids = await asyncio.to_thread(
            render_and_encode,
            engine.tokenizer,
            messages,
            template=template,
            budget=RenderBudget.for_context(engine.max_model_len),
        )
        return await self._prepare(
            request.model,
            request.adapter,
            request.sampling,
            request.structured_output,
            request.request_id,
            prompt_token_ids=ids,
        )

    async def Generate(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> pb.GenerateResponse:
        with self.manager.admit():
            loaded, engine_request = await self._generate_request(request)
            result = await collect(self._generate(loaded, engine_request))
        return pb.GenerateResponse(
            request_id=engine_request.request_id,
            model=loaded.model.name,
            completions=[
                pb.Completion(
                    index=c.index,
                    text=c.text,
                    token_ids=c.token_ids,
                    finish_reason=_FINISH[c.finish_reason],
                    logprobs=_logprobs(c.logprobs),
                )
                for c in result.completions
            ],
            usage=_usage(result.usage),
        )

    async def StreamGenerate(
        self, request: pb.StreamGenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        with self.manager.admit():
            loaded, engine_request = await self._generate_request(request)
            async for delta in self._generate(loaded, engine_request):
                yield pb.StreamGenerateResponse(
                    request_id=engine_request.request_id,
                    index=delta.index,
                    text=delta.text,
                    token_ids=delta.token_ids,
                    finish_reason=_FINISH[delta.finish_reason],
                    logprobs=_logprobs(delta.logprobs),
                    usage=_usage(delta.usage) if delta.usage else None,
                )

    async def Chat(self, request: pb.ChatRequest, context: aio.ServicerContext) -> pb.ChatResponse:
        with self.manager.admit():
            loaded, engine_request = await self._chat_request(request)
            result = await collect(self._generate(loaded, engine_request))
        return pb.ChatResponse(
            request_id=engine_request.request_id,
            model=loaded.model.name,
            choices=[
                pb.ChatChoice(
                    index=c.index,
                    message=pb.ChatMessage(role="assistant", content=c.text),
                    finish_reason=_FINISH[c.finish_reason],
                )
                for c in result.completions
            ],
            usage=_usage(result.usage),
        )

    async def StreamChat(
        self, request: pb.StreamChatRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.StreamChatResponse]:
        with self.manager.admit():
            loaded, engine_request = await self._chat_request(request)
            async for delta in self._generate(loaded, engine_request):
                yield pb.StreamChatResponse(
                    request_id=engine_request.request_id,
                    index=delta.index,
                    content=delta.text,
                    finish_reason=_FINISH[delta.finish_reason],
                    usage=_usage(delta.usage) if delta.usage else None,
                )

    async def Embed(self, request: pb.EmbedRequest, context: aio.ServicerContext) -> pb.EmbedResponse:
        if not request.inputs:
            raise InvalidArgument(
                "inputs is required",
                reason="MISSING_FIELD",
                violations=[FieldViolation("inputs", "required")],
            )
        if len(request.inputs) > MAX_EMBED_INPUTS:
            raise InvalidArgument(
                f"at most {MAX_EMBED_INPUTS} inputs per request, got {len(request.inputs)}",
                reason="TOO_MANY_INPUTS",
                violations=[FieldViolation("inputs", f"at most {MAX_EMBED_INPUTS}")],
            )
        with self.manager.admit():
            loaded, adapter_id = await self.manager.embed_target(request.model)
            normalize = request.normalize if request.HasField("normalize") else True
            inputs = list(request.inputs)
            result = await loaded.engine.embed(inputs, adapter_id=adapter_id, normalize=normalize)
        return pb.EmbedResponse(
            request_id=request.request_id or uuid.uuid4().hex,
            model=loaded.model.name,
            embeddings=[pb.Embedding(index=i, values=vector) for i, vector in enumerate(result.vectors)],
            usage=pb.Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
        )

    async def GenerateImage(
        self, request: pb.GenerateImageRequest, context: aio.ServicerContext
    ) -> pb.GenerateImageResponse:
        with self.manager.admit():
            loaded, adapter_id = await self.manager.image_target(request.model, request.adapter)
            image = image_request(request, adapter_id)
            result = await loaded.engine.generate_image(image)
        return image_response(image.request_id, loaded.model.name, result)

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: aio.ServicerContext
    ) -> pb.LoadModelResponse:
        max_len = request.max_model_len if request.HasField("max_model_len") else None
        if request.validate_only:
            model, engine, outcomes = await self.manager.validate(request.model, max_model_len=max_len)
            return pb.LoadModelResponse(
                loaded_model=pb.LoadedModel(model=model, engine=engine), outcomes=outcomes
            )
        loaded = await self.manager.load_any(request.model, max_model_len=max_len)
        outcomes = loaded.outcomes if isinstance(loaded, LoadedModel) else []
        return pb.LoadModelResponse(loaded_model=loaded_model_proto(loaded), outcomes=outcomes)

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        await self.manager.unload(request.model)
        return pb.UnloadModelResponse()

    async def ListLoadedModels(
        self, request: pb.ListLoadedModelsRequest, context: aio.ServicerContext
    ) -> pb.ListLoadedModelsResponse:
        return pb.ListLoadedModelsResponse(
            loaded_models=[loaded_model_proto(m) for m in _all_loaded(self.manager)]
        )

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        info = pb.GetServerInfoResponse()
        info.CopyFrom(self.server_info)
        info.loaded_models.extend(loaded_model_proto(m) for m in _all_loaded(self.manager))
        return info
