"""The vLLM engine: `Engine` over vLLM's ``AsyncLLM`` (V1), on CUDA or on the CPU.

The front end (tokenizer, detokenizer, output processing) lives in this process, next to
the gRPC server: on a 2-core CPU a front end in a separate process gets starved by the
engine's busy-waiting workers (streams arrive in one burst).  vLLM 0.32's ``AsyncLLM`` always runs its
``EngineCore`` in one child process (spawned; callers need an
``if __name__ == "__main__"`` guard); with ``tensor_parallel_size=1`` we set
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``uni`` executor so the model runs inside
that EngineCore process instead of in one more worker process.

Streaming uses ``RequestOutputKind.DELTA``; a consumer that is cancelled (or stops
iterating) aborts the vLLM request.  LoRA adapters are hot-loaded with ``LoRARequest``
(one int id per adapter) and mix with base requests in one batch.  Structured output uses
vLLM's ``StructuredOutputsParams`` (xgrammar/guidance backends; they run on the CPU too).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference_service.engines import vllm_lifeline
from inference_service.engines.base import (
    Engine,
    EngineDelta,
    EngineLoad,
    EngineRequest,
    FinishReason,
    ModelUnsupported,
    Tokenizer,
    Usage,
    read_adapter_rank,
)
from inference_service.engines.vllm_checks import (
    attention_problems,
    construction_problems,
    first_line,
    known_limitations,
    missing_kernels,
    vllm_model_class,
)
from inference_service.engines.vllm_requests import sampling_params, token_logprobs
from server_kit.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.ABORT,
    "repetition": FinishReason.STOP,
}


@dataclass(frozen=True)
class _Adapter:
    int_id: int
    path: str
    rank: int


class VllmEngine(Engine):
    """vLLM serving one base model and its LoRA adapters.

    Args:
        model_path: folder of the base model (config.json, safetensors, tokenizer).
        max_model_len: context length to serve; the model's when ``None``.
        kv_cache_memory_bytes: KV-cache size; ``None`` lets vLLM size it from the device
            (on the CPU that reserves several GiB: set it, e.g. 64 MiB for tiny models).
        max_num_seqs: most sequences in one batch.
        enable_lora: allow `add_adapter` (reserves LoRA buffers).
        max_lora_rank: largest adapter rank accepted (vLLM allows 1, 8, 16, 32, 64, ...).
        max_loras: most distinct adapters in one batch.
        dtype: weights' dtype; ``"auto"`` takes the checkpoint's, except that vLLM on the
            CPU runs float32 checkpoints in bfloat16: pass ``"float32"`` for exactness.
        tensor_parallel_size: devices per model.
        seed: engine seed (requests with their own seed are reproducible regardless).
        trust_remote_code: allow the model's own Python code.
        enforce_eager: skip torch.compile and graph capture: starts seconds faster, runs
            slower (tests and tiny models).
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str | Path,
        *,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        max_num_seqs: int = 64,
        enable_lora: bool = True,
        max_lora_rank: int = 16,
        max_loras: int = 4,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        seed: int = 0,
        trust_remote_code: bool = False,
        enforce_eager: bool = False,
    ) -> None:
        self._model_path = Path(model_path)
        self._requested_max_model_len = max_model_len
        self._kv_cache_memory_bytes = kv_cache_memory_bytes
        self._max_num_seqs = max_num_seqs
        self._enable_lora = enable_lora
        self._max_lora_rank = max_lora_rank
        self._max_loras = max_loras
        self._dtype = dtype
        self._tensor_parallel_size = tensor_parallel_size
        self._seed = seed
        self._trust_remote_code = trust_remote_code
        self._enforce_eager = enforce_eager
        self._llm: AsyncLLM | None = None
        self._tokenizer: Tokenizer | None = None
        self._adapters: dict[str, _Adapter] = {}
        self._next_lora_id = 1
        self._active: dict[str, str | None] = {}  # running request id -> its adapter id
        self._closed = False
        self._scheduler_stats: dict[int, Any] = {}  # engine core index -> its latest SchedulerStats

    # -- properties ---------------------------------------------------------------------

    @property
    def version(self) -> str:
        """vLLM's version."""
        from vllm import __version__

        return str(__version__)

    @property
    def model_path(self) -> Path:
        """Folder of the base model."""
        return self._model_path

    @property
    def max_model_len(self) -> int:
        """Context length the engine serves."""
        return int(self._require_llm().model_config.max_model_len)

    @property
    def dtype(self) -> str:
        """The dtype the weights run in (``"float32"``, ``"bfloat16"`` ...)."""
        return str(self._require_llm().model_config.dtype).removeprefix("torch.")

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer."""
        if self._tokenizer is None:
            raise FailedPrecondition("the engine is not started", reason="ENGINE_NOT_STARTED")
        return self._tokenizer

    @property
    def supports_structured_output(self) -> bool:
        """vLLM constrains output with JSON schemas, regexes and choices."""
        return True

    @property
    def supports_lora(self) -> bool:
        """Whether the engine was started with LoRA support."""
        return self._enable_lora

    @property
    def max_lora_rank(self) -> int:
        """Largest adapter rank `add_adapter` accepts."""
        return self._max_lora_rank

    @property
    def alive(self) -> bool:
        """False once vLLM's EngineCore died (its process exited or failed)."""
        return self._llm is None or not self._llm.errored

    def failure_cause(self, exc: BaseException) -> tuple[bool, str]:
        """After a failed step: a dead EngineCore process that exited on its own (an exception
        in the model's forward pass; vLLM logs the traceback) is the model's doing; one killed
        by a signal (OOM killer, operator) is not."""
        llm = self._llm
        resources = getattr(getattr(llm, "engine_core", None), "resources", None)
        processes = list(getattr(getattr(resources, "engine_manager", None), "processes", None) or [])
        for process in processes:
            process.join(timeout=10)
        codes = [p.exitcode for p in processes]
        killed = [c for c in codes if c is not None and c < 0]
        if killed:
            return False, f"vLLM's EngineCore process was killed by signal {-killed[0]}"
        if codes and all(c is not None for c in codes):
            return True, (
                f"vLLM's EngineCore process failed on the model's first forward step and exited "
                f"with code {codes[0]} (the worker's log has vLLM's traceback)"
            )
        return True, first_line(exc)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the vLLM engine (seconds: it spawns the EngineCore process)."""
        if self._closed:
            raise FailedPrecondition("the engine was closed", reason="ENGINE_CLOSED")
        if self._llm is not None:
            return
        if self._tensor_parallel_size == 1:
            # One process for the model (EngineCore runs it itself); see the module docstring.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # Building the engine blocks for seconds (import, spawn, load): keep the event loop free.
        # The first import of vLLM runs on its own: some vLLM module keeps a frame of its
        # import alive, and with it every caller frame, which must not hold the engine.
        await asyncio.to_thread(_import_vllm)
        tokenizer, llm = await asyncio.to_thread(self._build)
        # Constructed outside the loop, the output handler starts lazily; start it now so
        # that engine failures are seen before the first request.
        llm._run_output_handler()
        self._tokenizer, self._llm = tokenizer, llm

    def _engine_args(self) -> Any:
        """vLLM's `AsyncEngineArgs` for this engine's model and options."""
        from vllm import AsyncEngineArgs

        options: dict[str, Any] = {
            "model": str(self._model_path),
            "tokenizer": str(self._model_path),
            "trust_remote_code": self._trust_remote_code,
            "kv_cache_memory_bytes": self._kv_cache_memory_bytes,
            "max_num_seqs": self._max_num_seqs,
            "enable_lora": self._enable_lora,
            "max_lora_rank": self._max_lora_rank,
            "max_loras": self._max_loras,
            "dtype": self._dtype,
            "tensor_parallel_size": self._tensor_parallel_size,
            "distributed_executor_backend": "uni" if self._tensor_parallel_size == 1 else "mp",
            "seed": self._seed,
            "disable_log_stats": True,
            "enable_log_requests": False,
            "enforce_eager": self._enforce_eager,
        }
        if self._requested_max_model_len is not None:
            options["max_model_len"] = self._requested_max_model_len
        return AsyncEngineArgs(**options)

    def dry_run(self) -> None:
        """vLLM's own verdict without loading weights: build its engine configuration for the
        model (architecture, dtype, context, quantization, LoRA), ask the attention backend of
        this platform whether it accepts the model's head size and dtype, check the compiled
        kernels its layers need, then build its model class on the meta device and feed it
        the checkpoint's tensor names and shapes (see `vllm_checks`)."""
        _import_vllm()
        try:
            self._disable_lora_unless_supported()
            config = self._engine_args().create_engine_config()
        except Exception as exc:
            raise ModelUnsupported(self.name, "dry_run", first_line(exc)) from exc
        problems = attention_problems(config) + known_limitations(config)
        model_class = vllm_model_class(config)
        if model_class is not None:
            problems += missing_kernels(model_class)
            if not problems:
                problems = construction_problems(config, model_class, self._model_path)
        if problems:
            raise ModelUnsupported(self.name, "dry_run", "; ".join(problems))

    def _disable_lora_unless_supported(self) -> None:
        """vLLM refuses to start a model class without LoRA support when LoRA is enabled
        ("Gemma3nForCausalLM does not support LoRA yet"): serve such a model without
        adapters rather than not at all (`add_adapter` then answers LORA_UNSUPPORTED)."""
        if not self._enable_lora:
            return
        from vllm.model_executor.models import ModelRegistry
        from vllm.model_executor.models.interfaces import supports_lora
        from vllm.triton_utils import HAS_TRITON

        args = self._engine_args()
        args.enable_lora = False
        model_config = args.create_model_config()
        model_class, _ = ModelRegistry.resolve_model_cls(model_config.architectures, model_config)
        if not supports_lora(model_class):
            logger.info("%s does not support LoRA in vLLM: serving it without adapters", model_class.__name__)
            self._enable_lora = False
        elif model_config.is_moe and not HAS_TRITON:
            # vLLM's LoRA wrapper of MoE layers runs Triton kernels, whatever the platform
            # (on a CPU without Triton's CPU backend the first step dies): no adapters then.
            logger.info(
                "%s: vLLM's LoRA MoE kernels need Triton: serving it without adapters", model_class.__name__
            )
            self._enable_lora = False

    def _build(self) -> tuple[Tokenizer, AsyncLLM]:
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            self._disable_lora_unless_supported()
        except Exception as exc:
            raise FailedPrecondition(
                f"vLLM could not start {self._model_path}: {first_line(exc)}",
                reason="ENGINE_START_FAILED",
                metadata={"engine": self.name, "model_path": str(self._model_path)},
            ) from exc

        tokenizer = Tokenizer.from_pretrained(self._model_path, trust_remote_code=self._trust_remote_code)
        args = self._engine_args()
        vllm_lifeline.install()  # the EngineCore process dies with this server
        try:
            llm = AsyncLLM.from_engine_args(args, stat_loggers=[_stats_recorder(self._scheduler_stats)])
        except Exception as exc:
            raise FailedPrecondition(
                f"vLLM could not start {self._model_path}: {exc}",
                reason="ENGINE_START_FAILED",
                metadata={"engine": self.name, "model_path": str(self._model_path)},
            ) from exc
        return tokenizer, llm

    async def close(self) -> None:
        """Abort running requests and shut the engine down (its process exits)."""
        self._closed = True
        llm, self._llm = self._llm, None
        if llm is None:
            return
        if self._active:
            with contextlib.suppress(Exception):
                await llm.abort(list(self._active))
        # Stop the output handler first, in the loop: shutting the core down under it
        # would make it log the dead engine as an error.
        handler = llm.output_handler
        if handler is not None:
            handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler
        await asyncio.to_thread(llm.shutdown)
        del llm, handler
        gc.collect()  # the AsyncLLM's reference cycles, while the interpreter is whole

    def _require_llm(self) -> AsyncLLM:
        if self._llm is None:
            if self._closed:
                raise Unavailable("the engine was closed", reason="ENGINE_CLOSED")
            raise FailedPrecondition("the engine is not started", reason="ENGINE_NOT_STARTED")
        return self._llm

    # -- generation ---------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineDelta, None]:
        """Stream ``request``'s outputs as vLLM produces them (see `Engine.generate`)."""
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        llm = self._require_llm()
        prompt_ids = self.checked_prompt_token_ids(request)
        lora_request = self._lora_request(request.adapter_id)
        params = sampling_params(request.sampling, request.structured_output)
        request_id = request.request_id
        if request_id in self._active:
            raise AlreadyExists(f"request {request_id!r} is already running", reason="REQUEST_ID_IN_USE")

        self._active[request_id] = request.adapter_id
        completion_tokens: dict[int, int] = {}
        finished: set[int] = set()
        stream = llm.generate(tokens_input(prompt_ids), params, request_id, lora_request=lora_request)
        try:
            async for output in stream:
                deltas: list[EngineDelta] = []
                for completion in output.outputs:
                    index = completion.index
                    token_ids = tuple(completion.token_ids)
                    completion_tokens[index] = completion_tokens.get(index, 0) + len(token_ids)
                    reason = self._finish_reason(completion.finish_reason, request_id)
                    if reason is not None:
                        if index in finished:
                            continue
                        finished.add(index)
                    elif not token_ids and not completion.text:
                        continue
                    deltas.append(
                        EngineDelta(
                            index=index,
                            text=completion.text,
                            token_ids=token_ids,
                            finish_reason=reason,
                            logprobs=token_logprobs(
                                completion.logprobs, token_ids, request.sampling.logprobs
                            ),
                        )
                    )
                if output.finished:
                    usage = Usage(len(prompt_ids), sum(completion_tokens.values()))
                    if deltas:
                        last = deltas[-1]
                        deltas[-1] = EngineDelta(
                            last.index, last.text, last.token_ids, last.finish_reason, last.logprobs, usage
                        )
                    else:
                        deltas.append(EngineDelta(index=0, text="", token_ids=(), usage=usage))
                for delta in deltas:
                    yield delta
        except (asyncio.CancelledError, GeneratorExit):
            # vLLM aborts when its own generator is cancelled; when our consumer merely
            # stops iterating, the abort is ours to do.
            with contextlib.suppress(Exception):
                await llm.abort(request_id)
            raise
        except VLLMClientError as exc:
            raise InvalidArgument(str(exc), reason="INVALID_REQUEST") from exc
        except (EngineDeadError, EngineGenerateError) as exc:
            raise Unavailable(
                f"the vLLM engine failed: {exc}", reason="ENGINE_FAILED", metadata={"engine": self.name}
            ) from exc
        finally:
            self._active.pop(request_id, None)
            with contextlib.suppress(Exception):
                await stream.aclose()

    def _finish_reason(self, value: object, request_id: str) -> FinishReason | None:
        if value is None:
            return None
        text = str(value)
        if text == "error":
            raise Unavailable(
                f"vLLM failed request {request_id} (retryable)",
                reason="GENERATION_FAILED",
                metadata={"engine": self.name},
            )
        return _FINISH_REASONS.get(text, FinishReason.STOP)

    async def abort(self, request_id: str) -> None:
        """Abort ``request_id``: its stream ends with `FinishReason.ABORT`."""
        if self._llm is not None and request_id in self._active:
            await self._llm.abort(request_id)

    def num_unfinished_requests(self) -> int:
        """Requests vLLM's front end still tracks."""
        return 0 if self._llm is None else int(self._llm.get_num_unfinished_requests())

    def load_stats(self) -> EngineLoad:
        """Running and waiting requests and KV-cache use, from vLLM's latest scheduler stats."""
        stats = list(self._scheduler_stats.values())
        if not stats or self.num_unfinished_requests() == 0:
            # Idle (the last stats may predate the end of the last request): nothing held.
            return EngineLoad(running=0, waiting=0, kv_cache_usage=0.0 if stats else None)
        return EngineLoad(
            running=sum(int(s.num_running_reqs) for s in stats),
            waiting=sum(int(s.num_waiting_reqs) + int(s.num_skipped_waiting_reqs) for s in stats),
            kv_cache_usage=sum(float(s.kv_cache_usage) for s in stats) / len(stats),
        )

    # -- adapters -----------------------------------------------------------------------

    def _lora_request(self, adapter_id: str | None) -> Any:
        if adapter_id is None:
            return None
        adapter = self._adapters.get(adapter_id)
        if adapter is None:
            raise NotFound(
                f"adapter {adapter_id!r} is not loaded on {self._model_path.name}",
                reason="ADAPTER_NOT_LOADED",
                metadata={"adapter": adapter_id},
            )
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=adapter_id, lora_int_id=adapter.int_id, lora_path=adapter.path)

    async def add_adapter(self, adapter_id: str, path: str | Path, rank: int | None = None) -> None:
        """Hot-load a peft LoRA adapter (see `Engine.add_adapter`)."""
        llm = self._require_llm()
        if not self._enable_lora:
            raise FailedPrecondition("this engine was started without LoRA support", reason="LORA_DISABLED")
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
        if rank > self._max_lora_rank:
            raise FailedPrecondition(
                f"adapter rank {rank} exceeds the engine's max_lora_rank {self._max_lora_rank}; "
                "restart the engine with a larger max_lora_rank",
                reason="ADAPTER_RANK_TOO_LARGE",
                metadata={"rank": rank, "max_lora_rank": self._max_lora_rank},
            )
        from vllm.lora.request import LoRARequest

        int_id = self._next_lora_id
        self._next_lora_id += 1
        try:
            await llm.add_lora(LoRARequest(lora_name=adapter_id, lora_int_id=int_id, lora_path=path_str))
        except Exception as exc:
            raise FailedPrecondition(
                f"vLLM could not load adapter {adapter_id!r} from {path_str}: {exc}",
                reason="ADAPTER_LOAD_FAILED",
                metadata={"adapter": adapter_id},
            ) from exc
        self._adapters[adapter_id] = _Adapter(int_id=int_id, path=path_str, rank=rank)

    async def remove_adapter(self, adapter_id: str) -> None:
        """Unload an adapter; requests running on it are aborted."""
        llm = self._require_llm()
        adapter = self._adapters.pop(adapter_id, None)
        if adapter is None:
            raise NotFound(f"adapter {adapter_id!r} is not loaded", reason="ADAPTER_NOT_LOADED")
        running = [rid for rid, aid in self._active.items() if aid == adapter_id]
        if running:
            await llm.abort(running)
        await llm.remove_lora(adapter.int_id)

    def adapters(self) -> list[str]:
        """Ids of the loaded adapters, in load order."""
        return list(self._adapters)


def _import_vllm() -> None:
    import vllm.v1.engine.async_llm  # noqa: F401


def _stats_recorder(latest: dict[int, Any]) -> Any:
    """A vLLM stat-logger class keeping each engine core's latest ``SchedulerStats`` in ``latest``.

    vLLM passes scheduler stats (running and waiting requests, KV-cache use) only to
    stat loggers; this one keeps the last of them for `VllmEngine.load_stats`.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LatestSchedulerStats(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                latest[engine_idx] = scheduler_stats

        def log_engine_initialized(self) -> None:
            return None

    return LatestSchedulerStats
