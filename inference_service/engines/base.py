"""The engine interface the inference servicer depends on.

One `Engine` serves ONE base model (plus the LoRA adapters hot-loaded onto it); the
service keeps a dict model -> engine.  Entry points depend on this interface, never on a
concrete engine (the style of vLLM's ``vllm/engine/protocol.py``): `VllmEngine` and
`TransformersEngine` implement it.

Requests and outputs are plain dataclasses with no gRPC in them:

- `EngineRequest` -- prompt text or token ids, a `SamplingSpec` (every field optional, as
  in the proto ``SamplingParams``), an adapter id, a `StructuredOutputSpec`.
- `EngineDelta` -- what `Engine.generate` yields: new text and token ids of completion
  ``index``, its `FinishReason` on its last delta, log probabilities when asked, and
  `Usage` on the request's very last delta.

Cancelling the task that iterates `Engine.generate` (or closing the generator) aborts
the engine request: nothing keeps generating for nobody.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference_service.chat import ChatMessage, render_chat
from inference_service.sampling import SamplingSpec, validate_sampling
from server_kit.errors import FailedPrecondition, FieldViolation, InvalidArgument, Unavailable, Unimplemented

__all__ = [
    "ChatMessageLike",
    "Completion",
    "Engine",
    "EngineDelta",
    "EngineRequest",
    "EngineResult",
    "FinishReason",
    "ModelUnsupported",
    "SamplingSpec",
    "StructuredOutputSpec",
    "TokenLogprob",
    "Tokenizer",
    "Usage",
    "collect",
    "read_adapter_rank",
]


class FinishReason(enum.Enum):
    """Why a completion stopped."""

    STOP = "stop"
    """End-of-sequence token, a stop token id or a stop string."""
    LENGTH = "length"
    """``max_tokens`` or the context length was reached."""
    ABORT = "abort"
    """The request was aborted (cancelled by its caller or by `Engine.abort`)."""


@dataclass(frozen=True)
class StructuredOutputSpec:
    """An output constraint: exactly one of a JSON schema, a regex or a list of choices."""

    json_schema: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None

    def kind(self) -> str:
        """``"json_schema"``, ``"regex"`` or ``"choice"`` (the field that is set)."""
        set_fields = [
            name
            for name, value in (
                ("json_schema", self.json_schema),
                ("regex", self.regex),
                ("choice", self.choice),
            )
            if value is not None
        ]
        if len(set_fields) != 1:
            raise InvalidArgument(
                "a structured output constraint needs exactly one of json_schema, regex or choice",
                reason="INVALID_STRUCTURED_OUTPUT",
                violations=[
                    FieldViolation("structured_output", f"{len(set_fields)} constraints set, expected 1")
                ],
            )
        return set_fields[0]


@dataclass(frozen=True)
class EngineRequest:
    """One generation request for an engine.

    Exactly one of ``prompt`` (text, tokenized by the engine's tokenizer with
    ``add_special_tokens``) and ``prompt_token_ids`` is set.  ``adapter_id`` names a
    LoRA adapter added with `Engine.add_adapter` (``None``: the base model).
    """

    request_id: str
    prompt: str | None = None
    prompt_token_ids: Sequence[int] | None = None
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    adapter_id: str | None = None
    structured_output: StructuredOutputSpec | None = None
    add_special_tokens: bool = True
    """For a text prompt: let the tokenizer add its special tokens (BOS).  Chat prompts
    rendered with a template pass ``False`` (the template writes them)."""


@dataclass(frozen=True)
class TokenLogprob:
    """Log probability of one token (of the raw model distribution, before sampling)."""

    token_id: int
    logprob: float
    token: str
    top: tuple[TokenLogprob, ...] = ()
    """The ``logprobs`` most likely tokens at that position (empty when 0 were asked)."""


@dataclass(frozen=True)
class Usage:
    """Token counts of one request (all its completions)."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class EngineDelta:
    """New output of one completion of a request, as yielded by `Engine.generate`.

    ``finish_reason`` is set on the completion's last delta; ``usage`` on the request's
    last delta (after every completion finished).  Text and token ids may be empty (e.g.
    the final delta of an aborted request, or a token that ends in half a character).
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    usage: Usage | None = None


@dataclass(frozen=True)
class EngineLoad:
    """What an engine holds now (`Engine.load_stats`)."""

    running: int
    """Requests being generated."""
    waiting: int
    """Requests queued by the engine's scheduler, not yet running."""
    kv_cache_usage: float | None = None
    """Share of the KV cache in use, 0-1 (None: the engine does not say)."""


@dataclass(frozen=True)
class EmbedResult:
    """The vectors of `Engine.embed`, one per input in input order, and the tokens read."""

    vectors: list[list[float]]
    prompt_tokens: int


@dataclass
class Completion:
    """One whole completion, assembled from deltas by `collect`."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class EngineResult:
    """The whole result of a request: its completions (by index) and usage."""

    completions: list[Completion]
    usage: Usage


async def collect(deltas: AsyncIterator[EngineDelta]) -> EngineResult:
    """Consume a `Engine.generate` stream into whole completions (the unary result)."""
    by_index: dict[int, Completion] = {}
    usage: Usage | None = None
    async for delta in deltas:
        completion = by_index.setdefault(delta.index, Completion(index=delta.index))
        completion.text += delta.text
        completion.token_ids.extend(delta.token_ids)
        completion.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            completion.finish_reason = delta.finish_reason
        if delta.usage is not None:
            usage = delta.usage
    if usage is None:  # pragma: no cover - every engine sets usage on its last delta
        raise RuntimeError("the engine stream ended without usage")
    return EngineResult(completions=[by_index[i] for i in sorted(by_index)], usage=usage)


ChatMessageLike = ChatMessage | Mapping[str, Any]
"""A chat message: a `ChatMessage` or a mapping ``{"role": "user", "content": "..."}``."""


class Tokenizer:
    """The model's tokenizer (a transformers tokenizer), shared by both engines.

    Gives the servicer what it needs before generating: token counts for validation,
    chat rendering with the model's template (`inference_service.chat`).
    """

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf_tokenizer = hf_tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path, *, trust_remote_code: bool = False) -> Tokenizer:
        """Load the tokenizer of the model folder ``path`` (never downloads)."""
        from transformers import AutoTokenizer

        try:
            hf_tokenizer = AutoTokenizer.from_pretrained(
                str(path), trust_remote_code=trust_remote_code, local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(
                f"the tokenizer of {path} could not be loaded: {exc}",
                reason="TOKENIZER_LOAD_FAILED",
                metadata={"model_path": str(path)},
            ) from exc
        return cls(hf_tokenizer)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return len(self.hf_tokenizer)

    @property
    def eos_token_id(self) -> int | None:
        """The end-of-sequence token id, if the tokenizer has one."""
        eos = self.hf_tokenizer.eos_token_id
        return int(eos) if eos is not None else None

    @property
    def chat_template(self) -> str | None:
        """The model's own chat template (tokenizer_config.json or chat_template.jinja)."""
        template = getattr(self.hf_tokenizer, "chat_template", None)
        return template if isinstance(template, str) and template else None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""
        return list(self.hf_tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``."""
        return str(self.hf_tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self,
        messages: Sequence[ChatMessageLike],
        template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render ``messages`` with ``template`` (default: the model's own template).

        Raises FailedPrecondition ``NO_CHAT_TEMPLATE`` when there is no template and
        InvalidArgument for bad messages or a template that fails (see
        `inference_service.chat.render_chat`).
        """
        return render_chat(self, messages, template=template, add_generation_prompt=add_generation_prompt)


def read_adapter_rank(path: str | Path) -> int:
    """The LoRA rank ``r`` of the peft adapter folder ``path`` (adapter_config.json)."""
    config_path = Path(path) / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        return int(config["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FailedPrecondition(
            f"{config_path} is not a readable LoRA adapter config: {exc}",
            reason="INVALID_ADAPTER",
            metadata={"path": str(path)},
        ) from exc


class ModelUnsupported(FailedPrecondition):
    """The engine cannot run this model, and the model is the cause: the same model on the
    same engine fails the same way every time (FAILED_PRECONDITION
    ``MODEL_UNSUPPORTED_BY_ENGINE``, with the engine's own message).

    ``stage`` is where it was seen: ``"dry_run"`` (the engine's configuration for the
    model), ``"load"`` or ``"first_step"`` (the first generation step after loading).
    """

    def __init__(self, engine: str, stage: str, message: str) -> None:
        super().__init__(
            f"{engine} cannot run this model ({stage.replace('_', ' ')}): {message}",
            reason="MODEL_UNSUPPORTED_BY_ENGINE",
            metadata={"engine": engine, "stage": stage},
        )
        self.engine = engine
        self.stage = stage
        self.engine_message = message


FIRST_STEP_PROMPT = "Hello"
"""What `Engine.first_step` generates from."""


class Engine(abc.ABC):
    """A text-generation engine serving one base model and its LoRA adapters.

    Lifecycle: construct (cheap, nothing loaded) -> ``dry_run()`` (optional: the engine's
    own verdict on the model's configuration, no weights loaded) -> ``await start()`` ->
    ``await first_step()`` -> requests -> ``await close()`` (frees the model's memory; the
    engine cannot be restarted).
    """

    name: str
    """Engine name as reported to the catalog (``"vllm"``, ``"transformers"``)."""

    @property
    @abc.abstractmethod
    def version(self) -> str:
        """Version of the underlying library."""

    @property
    @abc.abstractmethod
    def model_path(self) -> Path:
        """Folder of the base model."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Context length served: prompt plus generated tokens."""

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (available after `start`)."""

    @property
    def supports_structured_output(self) -> bool:
        """Whether `EngineRequest.structured_output` is honoured."""
        return False

    @property
    def supports_lora(self) -> bool:
        """Whether adapters can be added."""
        return True

    @property
    def supports_embeddings(self) -> bool:
        """Whether `embed` computes embeddings (False: it raises ``EMBEDDINGS_UNSUPPORTED``)."""
        return False

    @property
    def alive(self) -> bool:
        """False once the engine died under the server (e.g. its process was killed): it
        serves nothing more and must be replaced.  Not started or closed is not dead."""
        return True

    def checked_prompt_token_ids(self, request: EngineRequest) -> list[int]:
        """The prompt's token ids, after validating ``request`` against this engine.

        Raises InvalidArgument: no prompt or both kinds (``INVALID_PROMPT``), token ids
        outside the vocabulary, bad sampling values, an empty prompt or one too long for
        the context (see `inference_service.sampling.validate_sampling`).
        """
        if (request.prompt is None) == (request.prompt_token_ids is None):
            raise InvalidArgument(
                "set exactly one of prompt and prompt_token_ids",
                reason="INVALID_PROMPT",
                violations=[FieldViolation("prompt", "exactly one of prompt and prompt_token_ids")],
            )
        tokenizer = self.tokenizer
        if request.prompt is not None:
            ids = tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        else:
            ids = [int(i) for i in request.prompt_token_ids or ()]
            vocab_size = tokenizer.vocab_size
            bad = [f"prompt_token_ids[{i}]" for i, t in enumerate(ids) if not 0 <= t < vocab_size]
            if bad:
                raise InvalidArgument(
                    f"prompt token ids must be in [0, {vocab_size})",
                    reason="INVALID_PROMPT",
                    violations=[FieldViolation(f, f"must be in [0, {vocab_size})") for f in bad[:10]],
                )
        validate_sampling(
            request.sampling,
            max_model_len=self.max_model_len,
            prompt_tokens=len(ids),
            vocab_size=tokenizer.vocab_size,
        )
        return ids

    def dry_run(self) -> None:
        """Validate the model's configuration with the engine's own checks, without loading
        weights (blocking: call it in a thread). Raises `ModelUnsupported` with the engine's
        message when the engine cannot run the model. The default checks nothing."""
        return None

    async def first_step(self) -> None:
        """Generate one token greedily on the started engine: some engines accept a model at
        load and fail at its first forward step. Raises `ModelUnsupported` (stage
        ``first_step``) when that step fails while the engine process lives on or dies with
        an error, so the failure is tied to the model."""
        request = EngineRequest(
            request_id=f"first-step-{id(self):x}",
            prompt=FIRST_STEP_PROMPT,
            sampling=SamplingSpec(max_tokens=1, temperature=0.0),
        )
        try:
            await collect(self.generate(request))
        except (InvalidArgument, FailedPrecondition):
            raise
        except Exception as exc:
            model_caused, message = await asyncio.to_thread(self.failure_cause, exc)
            if not model_caused:
                raise Unavailable(
                    f"the {self.name} engine failed at its first step: {message}",
                    reason="ENGINE_FAILED",
                    metadata={"engine": self.name},
                ) from exc
            raise ModelUnsupported(self.name, "first_step", message) from exc

    def failure_cause(self, exc: BaseException) -> tuple[bool, str]:
        """(whether the model caused the failure `exc`, the engine's account of it). Blocking.

        The default: an exception raised while running the model is the model's doing.
        Engines that run the model in another process override it to tell a process killed
        from outside (the host's OOM killer, an operator) from one that failed on the model.
        """
        return True, str(exc) or type(exc).__name__

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; returns when requests can be served."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Abort running requests and free the model's memory. Idempotent."""

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncGenerator[EngineDelta, None]:
        """Stream the outputs of ``request``.

        Raises (on first iteration) InvalidArgument for bad sampling values, a prompt
        longer than the context (``PROMPT_TOO_LONG``) or an unknown adapter
        (NotFound ``ADAPTER_NOT_LOADED``), Unimplemented
        ``STRUCTURED_OUTPUT_UNSUPPORTED`` where structured output is not supported.
        Cancelling the consumer aborts the request in the engine.
        """

    async def embed(
        self, texts: Sequence[str], *, adapter_id: str | None = None, normalize: bool = True
    ) -> EmbedResult:
        """One vector per text: the mean of the model's last hidden states over its tokens.

        ``normalize`` scales each vector to unit length. Raises InvalidArgument for an empty
        text (``INVALID_PROMPT``) or one longer than the context (``PROMPT_TOO_LONG``);
        engines that cannot embed (the default) raise Unimplemented ``EMBEDDINGS_UNSUPPORTED``.
        """
        raise Unimplemented(
            f"the {self.name} engine does not compute embeddings; use a transformers worker",
            reason="EMBEDDINGS_UNSUPPORTED",
            metadata={"engine": self.name},
        )

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Abort a running request: its stream ends with `FinishReason.ABORT`.

        Unknown or finished ids are ignored.
        """

    @abc.abstractmethod
    def num_unfinished_requests(self) -> int:
        """Requests the engine still holds (waiting or running)."""

    def load_stats(self) -> EngineLoad:
        """Requests waiting and running, and KV-cache use where known (for metrics).

        The default: every unfinished request runs (no queue), KV-cache use unknown.
        """
        return EngineLoad(running=self.num_unfinished_requests(), waiting=0)

    @abc.abstractmethod
    async def add_adapter(self, adapter_id: str, path: str | Path, rank: int | None = None) -> None:
        """Hot-load the LoRA adapter in folder ``path`` under ``adapter_id``.

        ``rank`` defaults to the one in adapter_config.json.  Adding an id again is a no-op
        when the path is the same; otherwise AlreadyExists ``ADAPTER_ALREADY_LOADED``.
        """

    @abc.abstractmethod
    async def remove_adapter(self, adapter_id: str) -> None:
        """Unload an adapter (NotFound ``ADAPTER_NOT_LOADED`` when it is not loaded)."""

    @abc.abstractmethod
    def adapters(self) -> list[str]:
        """Ids of the loaded adapters, in load order."""
