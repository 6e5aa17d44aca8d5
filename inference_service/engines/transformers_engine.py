"""The transformers engine: `Engine` over ``AutoModelForCausalLM`` (+ peft for adapters).

For CPU-only deployments and architectures vLLM does not support.  No batching: all
model work runs on one dedicated thread, one decoding step (one token per running
sequence) at a time, so concurrent requests interleave token by token and the event loop
stays free.  Cancellation and `abort` are honoured between tokens.

It follows vLLM's semantics so that both engines answer alike: the same sampling order
(penalties, greedy at temperature 0, temperature, min_p, top_k, top_p), log
probabilities of the raw model distribution, stop on the tokenizer's and
``generation_config.json``'s EOS ids (unless ``ignore_eos``) and on ``stop_token_ids``
(the stop token is in ``token_ids``, not in the text), stop strings cut from the text
and held back while streaming, and incremental detokenization with the tokenizers
``DecodeStream``.  In float32, greedy output equals vLLM's token for token.

LoRA adapters are loaded with peft; each step switches to the request's adapter
(``set_adapter``) or disables adapters for base-model requests.  Structured output is not
supported (Unimplemented ``STRUCTURED_OUTPUT_UNSUPPORTED``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import json
import random
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference_service.engines.base import (
    Engine,
    EngineDelta,
    EngineRequest,
    FinishReason,
    ModelUnsupported,
    Tokenizer,
    TokenLogprob,
    Usage,
    read_adapter_rank,
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


class _IncrementalDecoder:
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
class _Sequence:
    """One completion of a request."""

    index: int
    decoder: _IncrementalDecoder
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
class _RequestState:
    """A running request: its sequences and what stops them."""

    request_id: str
    prompt_ids: list[int]
    spec: SamplingSpec
    adapter_name: str | None
    stop_ids: frozenset[int]
    max_tokens: int
    generator: Any
    sequences: list[_Sequence]
    stop_buffer: int
    aborted: bool = False

    def running(self) -> list[_Sequence]:
        return [s for s in self.sequences if s.finish_reason is None]


@dataclass(frozen=True)
class _Adapter:
    name: str
    path: str
    rank: int


class TransformersEngine(Engine):
    """transformers (and peft) serving one base model and its LoRA adapters.

    Args:
        model_path: folder of the base model.
        max_model_len: context length to serve; the model's when ``None`` (a larger value
            than the model's is refused).
        dtype: ``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        device: ``"cpu"``, ``"cuda"`` ...; CUDA when available if ``None``.
        trust_remote_code: allow the model's own Python code.
    """

    name = "transformers"

    def __init__(
        self,
        model_path: str | Path,
        *,
        max_model_len: int | None = None,
        dtype: str = "auto",
        device: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self._model_path = Path(model_path)
        self._requested_max_model_len = max_model_len
        self._dtype = dtype
        self._device = device
        self._trust_remote_code = trust_remote_code
        self._model: Any = None
        self._tokenizer: Tokenizer | None = None
        self._max_model_len = 0
        self._generation_eos: frozenset[int] = frozenset()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._adapters: dict[str, _Adapter] = {}
        self._next_adapter = 1
        self._peft = False  # the model is wrapped by peft (set on the engine thread)
        self._requests: dict[str, _RequestState] = {}
        self._closed = False

    # -- properties ---------------------------------------------------------------------

    @property
    def version(self) -> str:
        """transformers' version."""
        import transformers

        return str(transformers.__version__)

    @property
    def model_path(self) -> Path:
        """Folder of the base model."""
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

    @property
    def dtype(self) -> str:
        """The dtype the weights run in."""
        return str(self._require_model().dtype).removeprefix("torch.")

    # -- lifecycle ----------------------------------------------------------------------

    def dry_run(self) -> None:
        """transformers' own verdict without loading weights: the config parses and
        `AutoModelForCausalLM` has a class for it."""
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        try:
            config = AutoConfig.from_pretrained(
                str(self._model_path), trust_remote_code=self._trust_remote_code, local_files_only=True
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelUnsupported(self.name, "dry_run", str(exc).splitlines()[0]) from exc
        model_type = getattr(config, "model_type", "")
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "auto_map", None):
            raise ModelUnsupported(
                self.name, "dry_run", f"AutoModelForCausalLM has no class for model type {model_type!r}"
            )

    async def start(self) -> None:
        """Load the tokenizer and the model (on the engine's thread)."""
        if self._closed:
            raise FailedPrecondition("the engine was closed", reason="ENGINE_CLOSED")
        if self._model is not None:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="transformers-engine"
        )
        await self._run(self._load)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        tokenizer = Tokenizer.from_pretrained(self._model_path, trust_remote_code=self._trust_remote_code)
        device = self._device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(self._model_path),
                dtype=self._dtype if self._dtype == "auto" else getattr(torch, self._dtype),
                trust_remote_code=self._trust_remote_code,
                local_files_only=True,
            )
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(
                f"transformers could not load {self._model_path}: {exc}",
                reason="ENGINE_START_FAILED",
                metadata={"engine": self.name, "model_path": str(self._model_path)},
            ) from exc
        model = model.to(device).eval()  # type: ignore[arg-type]
        model_len = _context_length(model.config) or tokenizer.hf_tokenizer.model_max_length
        if self._requested_max_model_len is not None:
            if self._requested_max_model_len > model_len:
                raise FailedPrecondition(
                    f"max_model_len {self._requested_max_model_len} exceeds the model's context {model_len}",
                    reason="MAX_MODEL_LEN_TOO_LARGE",
                    metadata={"max_model_len": self._requested_max_model_len, "model_context": model_len},
                )
            model_len = self._requested_max_model_len
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos_ids.append(tokenizer.eos_token_id)
        self._generation_eos = frozenset(int(i) for i in eos_ids)
        self._max_model_len = int(model_len)
        self._tokenizer = tokenizer
        self._model = model

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
        self._model = None
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

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

    # -- generation ---------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineDelta, None]:
        """Stream ``request``'s outputs, one token per running sequence per step."""
        self._require_model()
        prompt_ids = self.checked_prompt_token_ids(request)
        if request.structured_output is not None:
            request.structured_output.kind()  # a malformed constraint is still INVALID_ARGUMENT
            raise Unimplemented(
                "the transformers engine does not support structured output; use a vLLM worker",
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
    ) -> _RequestState:
        import torch

        spec = request.sampling
        stop_ids = set(spec.stop_token_ids)
        if not spec.ignore_eos:
            stop_ids |= self._generation_eos
        generator = torch.Generator(device=self._model.device)
        generator.manual_seed(spec.seed if spec.seed is not None else random.getrandbits(63))
        n = spec.n or 1
        tokenizer = self.tokenizer
        return _RequestState(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            spec=spec,
            adapter_name=adapter_name,
            stop_ids=frozenset(stop_ids),
            max_tokens=spec.max_tokens if spec.max_tokens is not None else DEFAULT_MAX_TOKENS,
            generator=generator,
            sequences=[
                _Sequence(index=i, decoder=_IncrementalDecoder(tokenizer, prompt_ids)) for i in range(n)
            ],
            stop_buffer=max((len(s) for s in spec.stop), default=1) - 1,
        )

    def _delta(self, state: _RequestState, seq: _Sequence) -> EngineDelta | None:
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

    def _step(self, state: _RequestState) -> None:
        """One decoding step (one token for every running sequence), on the engine thread."""
        import torch

        model = self._model
        if model is None:
            state.aborted = True
        if state.aborted:
            return
        with torch.inference_mode(), self._adapter_context(model, state.adapter_name):
            for seq in state.running():
                if state.aborted:
                    return
                if seq.cache is None:
                    input_ids = torch.tensor([state.prompt_ids], device=model.device)
                else:
                    input_ids = torch.tensor([[seq.token_ids[-1]]], device=model.device)
                out = model(input_ids=input_ids, past_key_values=seq.cache, use_cache=True)
                seq.cache = out.past_key_values
                raw = out.logits[0, -1].float()
                token_id = _sample(raw, state, seq)
                self._append(state, seq, token_id, raw)

    def _append(self, state: _RequestState, seq: _Sequence, token_id: int, raw: torch.Tensor) -> None:
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
            if state.spec.stop and _cut_stop_string(seq, state.spec.stop, len(new_text)):
                seq.finish_reason = FinishReason.STOP
        if seq.finish_reason is None and (
            len(seq.token_ids) >= state.max_tokens
            or len(state.prompt_ids) + len(seq.token_ids) >= self._max_model_len
        ):
            seq.finish_reason = FinishReason.LENGTH
        if seq.finish_reason is not None:
            seq.cache = None

    @contextlib.contextmanager
    def _adapter_context(self, model: Any, adapter_name: str | None) -> Iterator[None]:
        if not self._peft:
            yield
            return
        if adapter_name is None:
            with model.disable_adapter():
                yield
            return
        if model.active_adapter != adapter_name:
            model.set_adapter(adapter_name, inference_mode=True)
        yield

    async def abort(self, request_id: str) -> None:
        """Abort ``request_id`` after its current step."""
        state = self._requests.get(request_id)
        if state is not None:
            state.aborted = True

    def num_unfinished_requests(self) -> int:
        """Requests being generated."""
        return len(self._requests)

    # -- adapters -----------------------------------------------------------------------

    async def add_adapter(self, adapter_id: str, path: str | Path, rank: int | None = None) -> None:
        """Load a peft LoRA adapter (see `Engine.add_adapter`)."""
        self._require_model()
        path_str = str(Path(path))
        existing = self._adapters.get(adapter_id)
        if existing is not None:
            if existing.path == path_str:
                return
            raise AlreadyExists(
                f"adapter {adapter_id!r} is already loaded from {existing.path}",
                reason="ADAPTER_ALREADY_LOADED",
            )
        rank = rank if rank is not None else read_adapter_rank(path_str)
        # peft adapter names are module keys: no dots or slashes; catalog ids have both.
        name = f"adapter_{self._next_adapter}"
        self._next_adapter += 1
        await self._run(self._load_adapter, name, path_str, adapter_id)
        self._adapters[adapter_id] = _Adapter(name=name, path=path_str, rank=rank)

    def _load_adapter(self, name: str, path: str, adapter_id: str) -> None:
        from peft import PeftModel

        model = self._require_model()
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(path, adapter_name=name, is_trainable=False)
            else:
                self._model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=False)
                self._model.eval()
                self._peft = True
        except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as exc:
            raise FailedPrecondition(
                f"peft could not load adapter {adapter_id!r} from {path}: {exc}",
                reason="ADAPTER_LOAD_FAILED",
                metadata={"adapter": adapter_id},
            ) from exc

    async def remove_adapter(self, adapter_id: str) -> None:
        """Unload an adapter (the base model is left as it was); requests on it are aborted."""
        self._require_model()
        adapter = self._adapters.pop(adapter_id, None)
        if adapter is None:
            raise NotFound(f"adapter {adapter_id!r} is not loaded", reason="ADAPTER_NOT_LOADED")
        for state in self._requests.values():
            if state.adapter_name == adapter.name:
                state.aborted = True
        remaining = [a.name for a in self._adapters.values()]
        await self._run(self._unload_adapter, adapter.name, remaining)

    def _unload_adapter(self, name: str, remaining: list[str]) -> None:
        model = self._require_model()
        if not remaining:
            self._model = model.unload()  # removes the LoRA layers without merging them
            self._peft = False
            return
        if model.active_adapter == name:
            model.set_adapter(remaining[0], inference_mode=True)
        model.delete_adapter(name)

    def adapters(self) -> list[str]:
        """Ids of the loaded adapters, in load order."""
        return list(self._adapters)


def _context_length(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _cut_stop_string(seq: _Sequence, stops: tuple[str, ...], new_chars: int) -> bool:
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


def _sample(raw: torch.Tensor, state: _RequestState, seq: _Sequence) -> int:
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
