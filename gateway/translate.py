"""Translation between OpenAI's JSON and the inference and catalog protos.

Requests: sampling parameters (`sampling`), structured output (`json_schema`), prompts
and chat messages, refusing with a 400 what the gateway cannot honour rather than
dropping it. Replies: model cards, completions, chat completions and embeddings as
OpenAI answers them, with `usage` and finish reasons; `CompletionChunks` and `ChatChunks`
turn stream deltas into OpenAI's chunks (sent as events by `gateway.streaming`).
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from clients.inference import sampling_params
from gateway import errors
from gateway.openai_types import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponseFormat,
    StreamOptions,
)
from modelyard.catalog.v1 import model_pb2
from modelyard.inference.v1 import inference_service_pb2 as pb

FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}
"""OpenAI's `finish_reason` of each finish reason (None while a choice goes on)."""


# ------------------------------------------------------------------------------ requests


def sampling(body: CompletionRequest | ChatCompletionRequest) -> pb.SamplingParams:
    """The sampling parameters of a completion or chat request."""
    if isinstance(body, ChatCompletionRequest):
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = None
    else:
        max_tokens, logprobs = body.max_tokens, body.logprobs
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


def json_schema(response_format: ResponseFormat | None) -> dict[str, Any] | None:
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


def prompts(body: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request (text, or token ids); 400 for echo, suffix, best_of."""
    if body.echo:
        raise errors.bad_request("echo is not supported", param="echo")
    if body.suffix:
        raise errors.bad_request("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise errors.bad_request("best_of other than n is not supported", param="best_of")
    prompt = body.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise errors.bad_request("prompt must not be empty", param="prompt")
    if all(isinstance(item, int) for item in prompt):
        return [[int(item) for item in prompt]]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def messages(body: ChatCompletionRequest, *, trust_request_chat_template: bool) -> list[pb.ChatMessage]:
    """The messages of a chat request (text parts joined, `developer` as `system`).

    400 for tools, logprobs, non-text content parts, and a chat template in the request
    unless `trust_request_chat_template`.
    """
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
    result = []
    for index, message in enumerate(body.messages):
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


def embedding_inputs(body: EmbeddingRequest) -> list[str]:
    """The texts of an embeddings request; 400 for none, token ids, `dimensions`."""
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not inputs:
        raise errors.bad_request("input must not be empty", param="input")
    if not all(isinstance(item, str) for item in inputs):
        raise errors.bad_request("token ids as input are not supported; send text", param="input")
    if body.dimensions is not None:
        raise errors.bad_request("dimensions is not supported", param="dimensions")
    return [str(item) for item in inputs]


# ------------------------------------------------------------------------------ replies


def servable(model: model_pb2.Model) -> bool:
    """Whether the gateway lists and serves `model`: a READY LLM (or adapter)."""
    return model.state == model_pb2.MODEL_STATE_READY and model.kind == model_pb2.MODEL_KIND_LLM


def model_card(model: model_pb2.Model) -> dict[str, Any]:
    """OpenAI's model object of a catalog model (vLLM's `root`, `parent`, `max_model_len`)."""
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


def usage(*usages: pb.Usage) -> dict[str, int]:
    """OpenAI's `usage` of one reply, or of several added up."""
    return {
        "prompt_tokens": sum(item.prompt_tokens for item in usages),
        "completion_tokens": sum(item.completion_tokens for item in usages),
        "total_tokens": sum(item.total_tokens for item in usages),
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


def _reply(
    completion_id: str, kind: str, created: int, model: str, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    """The fields every completion and chunk starts with; `kind` is its `object`."""
    return {"id": completion_id, "object": kind, "created": created, "model": model, "choices": choices}


def completion(
    replies: Sequence[pb.GenerateResponse], body: CompletionRequest, completion_id: str, created: int
) -> dict[str, Any]:
    """`POST /v1/completions`' answer: `n` choices per prompt, one per reply, usage added up."""
    n = body.n or 1
    choices = [
        {
            "index": number * n + choice.index,
            "text": choice.text,
            "logprobs": _completion_logprobs(choice.logprobs) if body.logprobs is not None else None,
            "finish_reason": FINISH.get(choice.finish_reason),
        }
        for number, reply in enumerate(replies)
        for choice in reply.completions
    ]
    return {
        **_reply(completion_id, "text_completion", created, body.model, choices),
        "usage": usage(*(reply.usage for reply in replies)),
    }


def chat_completion(reply: pb.ChatResponse, model: str, completion_id: str, created: int) -> dict[str, Any]:
    """`POST /v1/chat/completions`' answer."""
    choices = [
        {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.message.content},
            "logprobs": None,
            "finish_reason": FINISH.get(choice.finish_reason),
        }
        for choice in reply.choices
    ]
    return {**_reply(completion_id, "chat.completion", created, model, choices), "usage": usage(reply.usage)}


def embeddings(reply: pb.EmbedResponse, body: EmbeddingRequest) -> dict[str, Any]:
    """`POST /v1/embeddings`' answer, vectors as floats or (`encoding_format` base64) float32 bytes."""

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


# ------------------------------------------------------------------------------ stream chunks

_Delta = TypeVar("_Delta", pb.StreamGenerateResponse, pb.StreamChatResponse)


class _Chunks(Generic[_Delta]):
    """The chunks of one stream: a callable from each delta, and from None at the end.

    With `stream_options.include_usage`, every chunk has `"usage": null` and the end adds
    a chunk with no choices and the last usage the stream reported.
    """

    object = ""

    def __init__(
        self, completion_id: str, created: int, model: str, stream_options: StreamOptions | None
    ) -> None:
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.include_usage = bool(stream_options and stream_options.include_usage)
        self._usage: pb.Usage | None = None

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """One chunk with `choices` (and `extra` fields)."""
        data = _reply(self.completion_id, self.object, self.created, self.model, choices)
        if self.include_usage:
            data["usage"] = None
        data.update(extra)
        return data

    def __call__(self, delta: _Delta | None) -> list[dict[str, Any]]:
        if delta is None:  # the end
            if self.include_usage and self._usage is not None:
                return [self.chunk([], usage=usage(self._usage))]
            return []
        if delta.HasField("usage"):
            self._usage = delta.usage
        return self.choices(delta)

    def choices(self, delta: _Delta) -> list[dict[str, Any]]:
        """The chunks of one delta."""
        raise NotImplementedError


class CompletionChunks(_Chunks[pb.StreamGenerateResponse]):
    """The chunks of a streamed completion (with logprobs and their text offsets when asked)."""

    object = "text_completion"

    def __init__(self, body: CompletionRequest, completion_id: str, created: int) -> None:
        super().__init__(completion_id, created, body.model, body.stream_options)
        self.logprobs = body.logprobs
        self._offsets = [0] * (body.n or 1)

    def choices(self, delta: pb.StreamGenerateResponse) -> list[dict[str, Any]]:
        if not delta.text and not delta.token_ids and not delta.finish_reason:
            return []
        logprobs = None
        if self.logprobs is not None and delta.index < len(self._offsets):
            logprobs = _completion_logprobs(delta.logprobs, self._offsets[delta.index])
            self._offsets[delta.index] += len(delta.text)
        choice = {
            "index": delta.index,
            "text": delta.text,
            "logprobs": logprobs,
            "finish_reason": FINISH.get(delta.finish_reason),
        }
        return [self.chunk([choice])]


class ChatChunks(_Chunks[pb.StreamChatResponse]):
    """The chunks of a streamed chat completion: the assistant role first, for each choice."""

    object = "chat.completion.chunk"

    def __init__(self, body: ChatCompletionRequest, completion_id: str, created: int) -> None:
        super().__init__(completion_id, created, body.model, body.stream_options)
        self._started: set[int] = set()

    def choices(self, delta: pb.StreamChatResponse) -> list[dict[str, Any]]:
        chunks = []
        if delta.index not in self._started:
            self._started.add(delta.index)
            role = {"index": delta.index, "delta": {"role": "assistant", "content": ""}}
            chunks.append(self.chunk([{**role, "logprobs": None, "finish_reason": None}]))
        if delta.content or delta.finish_reason:
            content = {"content": delta.content} if delta.content else {}
            choice = {
                "index": delta.index,
                "delta": content,
                "logprobs": None,
                "finish_reason": FINISH.get(delta.finish_reason),
            }
            chunks.append(self.chunk([choice]))
        return chunks
