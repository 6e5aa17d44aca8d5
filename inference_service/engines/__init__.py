"""Text-generation engines behind one interface (`Engine`).

`VllmEngine` (vLLM ``AsyncLLM``) is the default; `TransformersEngine` (transformers +
peft) serves CPU-only deployments and architectures vLLM lacks.  The concrete engines
import their heavy libraries lazily: importing this package is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inference_service.engines.base import (
    Completion,
    Engine,
    EngineDelta,
    EngineRequest,
    EngineResult,
    FinishReason,
    SamplingSpec,
    StructuredOutputSpec,
    Tokenizer,
    TokenLogprob,
    Usage,
    collect,
)

ENGINE_NAMES: tuple[str, ...] = ("vllm", "transformers")
"""Names `create_engine` knows."""


def create_engine(name: str, model_path: str | Path, **options: Any) -> Engine:
    """A new (not yet started) engine ``name`` for the model in ``model_path``.

    ``options`` are the engine's keyword arguments (see `VllmEngine`, `TransformersEngine`).
    """
    if name == "vllm":
        from inference_service.engines.vllm_engine import VllmEngine

        return VllmEngine(model_path, **options)
    if name == "transformers":
        from inference_service.engines.transformers_engine import TransformersEngine

        return TransformersEngine(model_path, **options)
    raise ValueError(f"unknown engine {name!r}; expected one of {ENGINE_NAMES}")


__all__ = [
    "ENGINE_NAMES",
    "Completion",
    "Engine",
    "EngineDelta",
    "EngineRequest",
    "EngineResult",
    "FinishReason",
    "SamplingSpec",
    "StructuredOutputSpec",
    "TokenLogprob",
    "Tokenizer",
    "Usage",
    "collect",
    "create_engine",
]
