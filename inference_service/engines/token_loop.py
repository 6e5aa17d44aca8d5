"""The token loop shared by the engines that run the model one token at a time in this
process (transformers, llama.cpp): `TokenLoopEngine`.

All model work runs on one dedicated thread, one decoding step (one token per running
sequence) at a time, so concurrent requests interleave token by token and the event loop
stays free. Cancellation and `abort` are honoured between tokens. An engine supplies the
logits of the next token (`_next_logits`); sampling, stop handling, detokenization and
log probabilities are here, identical for every such engine, and follow vLLM's
semantics: the same sampling order (penalties, greedy at temperature 0, temperature,
min_p, top_k, top_p), log probabilities of the raw model distribution, stop on the EOS
ids (unless ``ignore_eos``) and on ``stop_token_ids`` (the stop token is in
``token_ids``, not in the text), stop strings cut from the text and held back while
streaming, and incremental detokenization with the tokenizers ``DecodeStream``.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import random
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference_service.engines.base import (
    Engine,
    EngineDelta,
    EngineRequest,
    FinishReason,
    Tokenizer,
    TokenLogprob,
    Usage,
)
from inference_service.sampling import DEFAULT_MAX_TOKENS, SamplingSpec
from server_kit.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    Unavailable,
    Unimplemented,
)

if TYPE_CHECKING:
    import torch

_SAMPLING_EPS = 1e-5
"""Temperatures below this are greedy (as vLLM)."""


class IncrementalDecoder:
    """Text of generated tokens, one token at a time, as vLLM's fast detokenizer does."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._backend = getattr(tokenizer.hf_tokenizer, "_tokenizer", None)
        self._stream: Any = None
        self._ids: list[int] = []
        self._text = ""
        if self._backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(ids=prompt_ids, skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        """The text ``token_id`` adds (empty while a character is incomplete)."""
        if self._stream is not None:
            try:
                return self._stream.step(self._backend, token_id) or ""
            except Exception as exc:
                if not str(exc).startswith("Invalid prefix"):
                    raise
                from tokenizers.decoders import DecodeStream

                self._stream = DecodeStream(skip_special_tokens=True)
                return self._stream.step(self._backend, token_id) or ""
        # Slow tokenizers: decode everything, hold back an incomplete character.
        self._ids.append(token_id)
        full = self._tokenizer.decode(self._ids)
        if full.endswith("\ufffd") or not full.startswith(self._text):
            return ""
        new, self._text = full[len(self._text) :], full
        return new


@dataclass
class Sequence:
    """One completion of a request."""

    index: int
    decoder: IncrementalDecoder
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted_tokens: int = 0
    emitted_chars: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    emitted_logprobs: int = 0
    finish_reason: FinishReason | None = None
    final_sent: bool = False
    cache: Any = None


@dataclass
class RequestState:
    """A running request: its sequences and what stops them."""

    request_id: str
    prompt_ids: list[int]
    spec: SamplingSpec
    adapter_name: str | None
    stop_ids: frozenset[int]
    max_tokens: int
    generator: Any
    sequences: list[Sequence]
    stop_buffer: int
    aborted: bool = False

    def running(self) -> list[Sequence]:
        return [s for s in self.sequences if s.finish_reason is None]


class TokenLoopEngine(Engine):
    """An engine that runs the model token by token on its own thread (see the module doc).

    Subclasses load the model on the engine thread and set ``_model``, ``_tokenizer``,
    ``_max_model_len`` and ``_generation_eos``; ``_adapters`` maps adapter ids to objects
    with a ``name`` (what `RequestState.adapter_name` carries).
    """

    def __init__(self, model_path: Path) -> None:
        self._model_path = model_path
        self._model: Any = None
        self._tokenizer: Tokenizer | None = None
        self._max_model_len = 0
        self._generation_eos: frozenset[int] = frozenset()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._adapters: dict[str, Any] = {}
        self._requests: dict[str, RequestState] = {}
        self._closed = False

    @property
    def model_path(self) -> Path:
        """Where the model was loaded from."""
        return self._model_path

    @property
    def max_model_len(self) -> int:
        """Context length served."""
        self._require_model()
        return self._max_model_len

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer."""
        if self._tokenizer is None:
            raise FailedPrecondition("the engine is not started", reason="ENGINE_NOT_STARTED")
        return self._tokenizer

    def _start_thread(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{self.name}-engine"
        )

    async def close(self) -> None:
        """Abort running requests and free the model."""
        self._closed = True
        for state in self._requests.values():
            state.aborted = True
        executor = self._executor
        if executor is None:
            return
        # Runs after the steps already queued; later steps find no model.
        await self._run(self._release)
        executor.shutdown(wait=False)
        self._executor = None

    def _release(self) -> None:
        """Free the model (on the engine thread)."""
        self._model = None

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineDelta, None]:
        """Stream ``request``'s outputs, one token per running sequence per step."""
        self._require_model()
        prompt_ids = self.checked_prompt_token_ids(request)
        if request.structured_output is not None:
            request.structured_output.kind()  # a malformed constraint is still INVALID_ARGUMENT
            raise Unimplemented(
                f"the {self.name} engine does not support structured output; use a vLLM worker",
                reason="STRUCTURED_OUTPUT_UNSUPPORTED",
                metadata={"engine": self.name},
            )
        adapter_name = None
        if request.adapter_id is not None:
            adapter = self._adapters.get(request.adapter_id)
            if adapter is None:
                raise NotFound(
                    f"adapter {request.adapter_id!r} is not loaded on {self._model_path.name}",
                    reason="ADAPTER_NOT_LOADED",
                    metadata={"adapter": request.adapter_id},
                )
            adapter_name = adapter.name
        if request.request_id in self._requests:
            raise AlreadyExists(
                f"request {request.request_id!r} is already running", reason="REQUEST_ID_IN_USE"
            )

        state = self._new_state(request, prompt_ids, adapter_name)
        self._requests[request.request_id] = state
        try:
            while True:
                if state.aborted or self._closed:
                    for seq in state.running():
                        seq.finish_reason = FinishReason.ABORT
                else:
                    await self._run(self._step, state)
                deltas = [d for seq in state.sequences if (d := self._delta(state, seq)) is not None]
                done = not state.running()
                if done:
                    usage = Usage(len(prompt_ids), sum(len(s.token_ids) for s in state.sequences))
                    if deltas:
                        last = deltas[-1]
                        deltas[-1] = EngineDelta(
                            last.index, last.text, last.token_ids, last.finish_reason, last.logprobs, usage
                        )
                    else:  # pragma: no cover - the last step always finishes a sequence
                        deltas.append(EngineDelta(index=0, text="", token_ids=(), usage=usage))
                for delta in deltas:
                    yield delta
                if done:
                    return
        finally:
            # Cancelled, closed by the consumer or done: the request is gone. A step still
            # running on the engine thread finishes and is discarded.
            state.aborted = True
            self._requests.pop(request.request_id, None)

    def _new_state(
        self, request: EngineRequest, prompt_ids: list[int], adapter_name: str | None
    ) -> RequestState:
        import torch

        spec = request.sampling
        stop_ids = set(spec.stop_token_ids)
        if not spec.ignore_eos:
            stop_ids |= self._generation_eos
        generator = torch.Generator(device=self._sampling_device())
        generator.manual_seed(spec.seed if spec.seed is not None else random.getrandbits(63))
        n = spec.n or 1
        tokenizer = self.tokenizer
        return RequestState(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            spec=spec,
            adapter_name=adapter_name,
            stop_ids=frozenset(stop_ids),
            max_tokens=spec.max_tokens if spec.max_tokens is not None else DEFAULT_MAX_TOKENS,
            generator=generator,
            sequences=[
                Sequence(index=i, decoder=IncrementalDecoder(tokenizer, prompt_ids)) for i in range(n)
            ],
            stop_buffer=max((len(s) for s in spec.stop), default=1) - 1,
        )

    def _delta(self, state: RequestState, seq: Sequence) -> EngineDelta | None:
        """What ``seq`` produced since its last delta (None if nothing)."""
        finished = seq.finish_reason is not None
        if seq.final_sent:
            return None
        end = len(seq.text) if finished else max(seq.emitted_chars, len(seq.text) - state.stop_buffer)
        text = seq.text[seq.emitted_chars : end]
        token_ids = tuple(seq.token_ids[seq.emitted_tokens :])
        logprobs = tuple(seq.logprobs[seq.emitted_logprobs :])
        if not finished and not text and not token_ids:
            return None
        seq.emitted_chars = end
        seq.emitted_tokens = len(seq.token_ids)
        seq.emitted_logprobs = len(seq.logprobs)
        seq.final_sent = finished
        return EngineDelta(seq.index, text, token_ids, seq.finish_reason, logprobs)

    def _step(self, state: RequestState) -> None:
        """One decoding step (one token for every running sequence), on the engine thread."""
        if self._model is None:
            state.aborted = True
        if state.aborted:
            return
        with self._step_context(state):
            for seq in state.running():
                if state.aborted:
                    return
                raw = self._next_logits(state, seq)
                token_id = sample(raw, state, seq)
                self._append(state, seq, token_id, raw)

    def _sampling_device(self) -> Any:
        """Where `_next_logits` returns its logits (the sampling generator lives there)."""
        return "cpu"

    def _step_context(self, state: RequestState) -> contextlib.AbstractContextManager[None]:
        """Entered around one step (the transformers engine: inference mode and the adapter)."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def _next_logits(self, state: RequestState, seq: Sequence) -> torch.Tensor:
        """The raw logits (float32, 1-D) of the token after ``seq``'s tokens, on the engine
        thread; ``seq.cache`` is the engine's to keep between steps (None on the first)."""

    def _append(self, state: RequestState, seq: Sequence, token_id: int, raw: torch.Tensor) -> None:
        """Add ``token_id`` to ``seq``: text, log probabilities, stop checks."""
        import torch

        seq.token_ids.append(token_id)
        if state.spec.logprobs is not None:
            logprobs = torch.log_softmax(raw, dim=-1)
            top: tuple[TokenLogprob, ...] = ()
            if state.spec.logprobs > 0:
                values, ids = torch.topk(logprobs, state.spec.logprobs)
                top = tuple(
                    TokenLogprob(int(i), float(v), self.tokenizer.decode([int(i)], skip_special_tokens=False))
                    for v, i in zip(values.tolist(), ids.tolist(), strict=True)
                )
            seq.logprobs.append(
                TokenLogprob(
                    token_id,
                    float(logprobs[token_id]),
                    self.tokenizer.decode([token_id], skip_special_tokens=False),
                    top,
                )
            )
        if token_id in state.stop_ids:
            seq.finish_reason = FinishReason.STOP  # the stop token's text is not output
            seq.cache = None
            return
        new_text = seq.decoder.step(token_id)
        if new_text:
            seq.text += new_text
            if state.spec.stop and cut_stop_string(seq, state.spec.stop, len(new_text)):
                seq.finish_reason = FinishReason.STOP
        if seq.finish_reason is None and (
            len(seq.token_ids) >= state.max_tokens
            or len(state.prompt_ids) + len(seq.token_ids) >= self._max_model_len
        ):
            seq.finish_reason = FinishReason.LENGTH
        if seq.finish_reason is not None:
            seq.cache = None

    async def abort(self, request_id: str) -> None:
        """Abort ``request_id`` after its current step."""
        state = self._requests.get(request_id)
        if state is not None:
            state.aborted = True

    def num_unfinished_requests(self) -> int:
        """Requests being generated."""
        return len(self._requests)

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._executor is None:
            raise Unavailable("the engine was closed", reason="ENGINE_CLOSED")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _require_model(self) -> Any:
        if self._model is None:
            if self._closed:
                raise Unavailable("the engine was closed", reason="ENGINE_CLOSED")
            raise FailedPrecondition("the engine is not started", reason="ENGINE_NOT_STARTED")
        return self._model


def cut_stop_string(seq: Sequence, stops: tuple[str, ...], new_chars: int) -> bool:
    """Truncate ``seq.text`` before the earliest stop string that ``new_chars`` completed."""
    best: int | None = None
    best_end = 0
    for stop in stops:
        index = seq.text.find(stop, max(0, len(seq.text) - new_chars - len(stop) + 1))
        if index != -1 and (best is None or index + len(stop) < best_end):
            best, best_end = index, index + len(stop)
    if best is None:
        return False
    seq.text = seq.text[:best]
    return True


def sample(raw: torch.Tensor, state: RequestState, seq: Sequence) -> int:
    """The next token from raw logits, with vLLM's order of sampling steps."""
    import torch

    spec = state.spec
    logits = raw
    repetition = spec.repetition_penalty
    if repetition is not None and repetition != 1.0:
        logits = logits.clone()
        seen = torch.tensor(sorted(set(state.prompt_ids) | set(seq.token_ids)), device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / repetition, values * repetition)
    presence = spec.presence_penalty or 0.0
    frequency = spec.frequency_penalty or 0.0
    if (presence or frequency) and seq.token_ids:
        counts = torch.bincount(
            torch.tensor(seq.token_ids, device=logits.device), minlength=logits.shape[-1]
        ).to(logits.dtype)[: logits.shape[-1]]
        logits = logits - frequency * counts - presence * (counts > 0).to(logits.dtype)
    temperature = spec.temperature if spec.temperature is not None else 1.0
    if temperature < _SAMPLING_EPS:
        return int(torch.argmax(logits))
    logits = logits / temperature
    min_p = spec.min_p or 0.0
    if min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    top_k = spec.top_k if spec.top_k is not None and spec.top_k > 0 else 0
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = spec.top_p if spec.top_p is not None else 1.0
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        # Extreme but valid values (temperature 1e-300, penalties 1e300) overflow the
        # logits: take their limit, the most likely token, rather than fail the request.
        return int(torch.argmax(torch.nan_to_num(logits, nan=float("-inf"))))
    return int(torch.multinomial(probs, 1, generator=state.generator))
