"""The llama.cpp engine: `Engine` over ``llama_cpp.Llama`` (llama-cpp-python), for GGUF files.

GGUF is what Ollama and llama.cpp users have; vLLM 0.32 has no GGUF loader and
transformers only dequantizes GGUF to full precision. This engine runs the file as
llama.cpp does, quantized, on the CPU (or on GPUs when llama-cpp-python was built for
them), behind the same interface as the others.

It is a `TokenLoopEngine`: llama.cpp evaluates the tokens and gives the next token's
logits; sampling (with the request's seed), stop strings, detokenization and log
probabilities are the token loop's, identical to the transformers engine's. The
tokenizer and the chat template are the GGUF file's own, read by transformers
(``AutoTokenizer.from_pretrained(folder, gguf_file=name)``), so chat renders exactly as
with the other engines.

One llama.cpp context holds one sequence: each step evaluates only the tokens the
context does not already hold (the longest common prefix is kept), so one request
streams at llama.cpp's speed and concurrent requests interleave correctly, re-evaluating
their prompt when they take turns. LoRA adapters and structured output are not offered.

The dry run loads the file's vocabulary and metadata only (``vocab_only=True``): llama.cpp
itself says whether it knows the architecture, no weights read.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference_service.engines.base import ModelUnsupported, Tokenizer
from inference_service.engines.token_loop import RequestState, Sequence, TokenLoopEngine
from server_kit.errors import FailedPrecondition, NotFound

if TYPE_CHECKING:
    import torch

DEFAULT_CONTEXT = 4096
"""Tokens served when the request sets no `max_model_len` (llama-server's default
``--ctx-size``), capped by the context the model was trained for."""


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file ("" when it cannot be read)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).get_field("general.architecture")
        return str(field.contents()) if field is not None else ""
    except Exception:
        return ""


class LlamaCppEngine(TokenLoopEngine):
    """llama.cpp serving one GGUF file.

    Args:
        model_path: the GGUF file.
        max_model_len: context length to serve; ``min(model's, 4096)`` when ``None``.
        threads: CPU threads llama.cpp uses (None: its default).
        gpu_layers: layers offloaded to a GPU (llama-cpp-python built with GPU support).
    """

    name = "llama-cpp"

    def __init__(
        self,
        model_path: str | Path,
        *,
        max_model_len: int | None = None,
        threads: int | None = None,
        gpu_layers: int = 0,
    ) -> None:
        super().__init__(Path(model_path))
        self._requested_max_model_len = max_model_len
        self._threads = threads
        self._gpu_layers = gpu_layers

    @property
    def version(self) -> str:
        """llama-cpp-python's version."""
        import llama_cpp

        return str(llama_cpp.__version__)

    @property
    def supports_lora(self) -> bool:
        """Adapters are not offered on llama.cpp workers (merge them into the model instead)."""
        return False

    # -- lifecycle ----------------------------------------------------------------------

    def dry_run(self) -> None:
        """llama.cpp's own verdict without loading weights: the file's vocabulary and
        metadata load (llama.cpp knows its architecture)."""
        from llama_cpp import Llama

        try:
            with _quiet():
                Llama(str(self._model_path), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            arch = gguf_architecture(self._model_path)
            what = f"architecture {arch!r}" if arch else "this file"
            raise ModelUnsupported(self.name, "dry_run", f"llama.cpp cannot load {what}: {exc}") from exc

    async def start(self) -> None:
        """Load the GGUF file and its tokenizer (on the engine's thread)."""
        if self._closed:
            raise FailedPrecondition("the engine was closed", reason="ENGINE_CLOSED")
        if self._model is not None:
            return
        self._start_thread()
        await self._run(self._load)

    def _load(self) -> None:
        import llama_cpp
        from llama_cpp import Llama
        from transformers import AutoTokenizer

        path = self._model_path
        try:
            hf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as exc:
            raise FailedPrecondition(
                f"the tokenizer of {path.name} could not be read from the GGUF file: {exc}",
                reason="ENGINE_START_FAILED",
                metadata={"engine": self.name, "model_path": str(path)},
            ) from exc
        options: dict[str, Any] = {"n_gpu_layers": self._gpu_layers, "verbose": False, "seed": 0}
        if self._threads:
            options["n_threads"] = self._threads
        try:
            with _quiet():
                probe = Llama(str(path), vocab_only=True, verbose=False)
                trained = int(llama_cpp.llama_model_n_ctx_train(probe.model)) or DEFAULT_CONTEXT
                del probe
                n_ctx = self._requested_max_model_len or min(trained, DEFAULT_CONTEXT)
                if n_ctx > trained:
                    raise FailedPrecondition(
                        f"max_model_len {n_ctx} exceeds the model's context {trained}",
                        reason="MAX_MODEL_LEN_TOO_LARGE",
                        metadata={"max_model_len": n_ctx, "model_context": trained},
                    )
                llm = Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), **options)
        except (ValueError, RuntimeError, OSError) as exc:
            raise FailedPrecondition(
                f"llama.cpp could not load {path}: {exc}",
                reason="ENGINE_START_FAILED",
                metadata={"engine": self.name, "model_path": str(path)},
            ) from exc
        tokenizer = Tokenizer(hf_tokenizer)
        eos = {int(llm.token_eos())}
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self._generation_eos = frozenset(i for i in eos if i >= 0)
        self._max_model_len = int(llm.n_ctx())
        self._tokenizer = tokenizer
        self._model = llm

    def _release(self) -> None:
        llm, self._model = self._model, None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.close()

    # -- the token loop's model step ------------------------------------------------------

    def _next_logits(self, state: RequestState, seq: Sequence) -> torch.Tensor:
        """Evaluate what the context lacks of the sequence's tokens; the last token's logits."""
        import llama_cpp
        import numpy as np
        import torch

        llm = self._model
        wanted = [*state.prompt_ids, *seq.token_ids]
        held = llm.input_ids[: llm.n_tokens].tolist()
        common = 0
        for have, want in zip(held, wanted, strict=False):
            if have != want:
                break
            common += 1
        common = min(common, len(wanted) - 1)  # the last token is evaluated for its logits
        if common < llm.n_tokens and (
            getattr(llm, "_is_recurrent", False) or getattr(llm, "_is_hybrid", False)
        ):
            llm.reset()  # a recurrent state cannot be cut back: start over
            common = 0
        llm.n_tokens = common
        llm.eval(wanted[common:])
        pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        logits = np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy()
        return torch.from_numpy(logits).float()

    # -- adapters -----------------------------------------------------------------------

    async def add_adapter(self, adapter_id: str, path: str | Path, rank: int | None = None) -> None:
        """Not offered: merge the adapter into the model and export it to GGUF instead."""
        raise FailedPrecondition(
            "the llama.cpp engine does not apply LoRA adapters; serve the adapter on vLLM or "
            "transformers, or merge it into its base model",
            reason="LORA_UNSUPPORTED",
            metadata={"engine": self.name},
        )

    async def remove_adapter(self, adapter_id: str) -> None:
        """No adapter is ever loaded here."""
        raise NotFound(f"adapter {adapter_id!r} is not loaded", reason="ADAPTER_NOT_LOADED")

    def adapters(self) -> list[str]:
        """None."""
        return []


@contextlib.contextmanager
def _quiet() -> Any:
    """llama.cpp prints to stderr while loading even with ``verbose=False``; keep Python's quiet."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield
