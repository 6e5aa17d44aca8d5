"""The transformers engine: `Engine` over ``AutoModelForCausalLM`` (+ peft for adapters).

For CPU-only deployments and architectures vLLM does not support. No batching: the
token loop of `inference_service.engines.token_loop` (one step, one token per running
sequence, on the engine's own thread) with vLLM's sampling and stop semantics; this
module supplies the logits (the model with its KV cache per sequence). It stops on the
tokenizer's and ``generation_config.json``'s EOS ids. In float32, greedy output equals
vLLM's token for token.

LoRA adapters are loaded with peft; each step switches to the request's adapter
(``set_adapter``) or disables adapters for base-model requests.  Structured output is not
supported (Unimplemented ``STRUCTURED_OUTPUT_UNSUPPORTED``). Embeddings are the mean of
the last hidden states over an input's tokens (`TransformersEngine.embed`).
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Iterator
from collections.abc import Sequence as PySequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference_service.engines.base import EmbedResult, ModelUnsupported, Tokenizer, read_adapter_rank
from inference_service.engines.token_loop import RequestState, Sequence, TokenLoopEngine
from server_kit.errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound

if TYPE_CHECKING:
    import torch


_NO_KV_CACHE = object()
"""`Sequence.cache` of a model whose outputs carry no `past_key_values` (recurrent models)."""


@dataclass(frozen=True)
class _Adapter:
    name: str
    path: str
    rank: int


class TransformersEngine(TokenLoopEngine):
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
        super().__init__(Path(model_path))
        self._requested_max_model_len = max_model_len
        self._dtype = dtype
        self._device = device
        self._trust_remote_code = trust_remote_code
        self._adapters: dict[str, _Adapter] = {}
        self._next_adapter = 1
        self._peft = False  # the model is wrapped by peft (set on the engine thread)

    # -- properties ---------------------------------------------------------------------

    @property
    def version(self) -> str:
        """transformers' version."""
        import transformers

        return str(transformers.__version__)

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
        self._build_on_meta(config)

    def _build_on_meta(self, config: Any) -> None:
        """The model loaded the way `start` loads it, but onto PyTorch's meta device (no
        memory, no data): what its constructor or weight loading refuses is found first. In a
        worker that also runs vLLM this matters: vLLM registers its own config classes for some
        model types ("'KimiLinearConfig' object has no attribute 'num_local_experts'")."""
        from transformers import AutoModelForCausalLM

        try:
            AutoModelForCausalLM.from_pretrained(
                str(self._model_path),
                config=config,
                device_map="meta",
                trust_remote_code=self._trust_remote_code,
                local_files_only=True,
            )
        except Exception as exc:
            if "meta" in str(exc).lower():
                return  # only the meta device is refused: inconclusive, the load decides
            message = str(exc).splitlines()[0] if str(exc) else ""
            raise ModelUnsupported(
                self.name, "dry_run", f"transformers cannot load it: {type(exc).__name__}: {message}"
            ) from exc

    async def start(self) -> None:
        """Load the tokenizer and the model (on the engine's thread)."""
        if self._closed:
            raise FailedPrecondition("the engine was closed", reason="ENGINE_CLOSED")
        if self._model is not None:
            return
        self._start_thread()
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

    def _release(self) -> None:
        """Free the model and the GPU cache (on the engine thread)."""
        self._model = None
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # -- generation ---------------------------------------------------------------------

    def _sampling_device(self) -> Any:
        return self._model.device

    @contextlib.contextmanager
    def _step_context(self, state: RequestState) -> Iterator[None]:
        """Inference mode, with the request's adapter on (or every adapter off)."""
        import torch

        with torch.inference_mode(), self._adapter_context(self._model, state.adapter_name):
            yield

    def _next_logits(self, state: RequestState, seq: Sequence) -> torch.Tensor:
        """The whole prompt on the first step, then the last token over the sequence's KV cache."""
        import torch

        model = self._model
        if seq.cache is None or seq.cache is _NO_KV_CACHE:
            # First step, or a model without a KV cache (Mamba, RWKV, ...): the whole sequence.
            input_ids = torch.tensor([[*state.prompt_ids, *seq.token_ids]], device=model.device)
            cache = None
        else:
            input_ids = torch.tensor([[seq.token_ids[-1]]], device=model.device)
            cache = seq.cache
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        seq.cache = getattr(out, "past_key_values", None) or _NO_KV_CACHE
        return out.logits[0, -1].float()

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

    # -- embeddings ---------------------------------------------------------------------

    @property
    def supports_embeddings(self) -> bool:
        """Mean-pooled last hidden states (`embed`)."""
        return True

    async def embed(
        self, texts: PySequence[str], *, adapter_id: str | None = None, normalize: bool = True
    ) -> EmbedResult:
        """Mean-pooled last hidden states, one text at a time (see `Engine.embed`)."""
        self._require_model()
        adapter_name = None
        if adapter_id is not None:
            adapter = self._adapters.get(adapter_id)
            if adapter is None:
                raise NotFound(f"adapter {adapter_id!r} is not loaded", reason="ADAPTER_NOT_LOADED")
            adapter_name = adapter.name
        prompts = []
        for index, text in enumerate(texts):
            ids = self.tokenizer.encode(text)
            if not text or not ids:
                raise InvalidArgument(
                    "inputs must not be empty",
                    reason="INVALID_PROMPT",
                    violations=[FieldViolation(f"inputs[{index}]", "must not be empty")],
                )
            if len(ids) > self._max_model_len:
                raise InvalidArgument(
                    f"input {index} has {len(ids)} tokens, more than the context ({self._max_model_len})",
                    reason="PROMPT_TOO_LONG",
                    violations=[FieldViolation(f"inputs[{index}]", f"at most {self._max_model_len} tokens")],
                )
            prompts.append(ids)
        vectors = await self._run(self._embed, prompts, adapter_name, normalize)
        return EmbedResult(vectors=vectors, prompt_tokens=sum(len(ids) for ids in prompts))

    def _embed(
        self, prompts: list[list[int]], adapter_name: str | None, normalize: bool
    ) -> list[list[float]]:
        import torch

        model = self._require_model()
        vectors = []
        with torch.inference_mode(), self._adapter_context(model, adapter_name):
            for ids in prompts:
                out = model(input_ids=torch.tensor([ids], device=model.device), output_hidden_states=True)
                vector = out.hidden_states[-1][0].float().mean(dim=0)
                if normalize:
                    vector = torch.nn.functional.normalize(vector, dim=0)
                vectors.append([float(value) for value in vector.tolist()])
        return vectors

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
