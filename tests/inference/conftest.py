"""Session fixtures of the inference tests: one tiny Llama, one LoRA adapter, one engine of each kind.

Building the model takes seconds and starting vLLM takes seconds (it spawns its
EngineCore process), so each is done once per test session and shared.  The model is
float32: in float32 vLLM's greedy output equals transformers' token for token (vLLM on
the CPU would run a float32 checkpoint in bfloat16 with ``dtype="auto"``).
"""

from __future__ import annotations

import os

# vLLM reads these when its engine starts; set before any test imports it.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inference_service.engines.transformers_engine import TransformersEngine
from inference_service.engines.vllm_engine import VllmEngine
from tinymodels.llm import build_llm, build_lora_adapter

TINY_ADAPTER_ID = "models/tiny-llama-ft-lora"
"""Id under which the session engines hold the tiny LoRA adapter."""

TEST_KV_CACHE_BYTES = 64 * 1024 * 1024
"""KV cache of test vLLM engines (vLLM would otherwise reserve GiBs on the CPU)."""


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float32 Llama (random weights, ChatML template, context 256)."""
    return build_llm(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_lora(tiny_llm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-8 LoRA adapter of `tiny_llm` with random (non-zero) weights."""
    return build_lora_adapter(tiny_llm, tmp_path_factory.mktemp("adapters") / "tiny-llama-lora", r=8)


@pytest.fixture(scope="session")
async def vllm_engine(tiny_llm: Path, tiny_lora: Path) -> AsyncIterator[VllmEngine]:
    """The session's vLLM engine on `tiny_llm`, with `tiny_lora` loaded as TINY_ADAPTER_ID."""
    engine = VllmEngine(
        tiny_llm,
        dtype="float32",
        kv_cache_memory_bytes=TEST_KV_CACHE_BYTES,
        max_num_seqs=32,
        max_lora_rank=8,
        max_loras=2,
        enforce_eager=True,  # no torch.compile: starts ~7 s sooner on 2 cores
    )
    await engine.start()
    await engine.add_adapter(TINY_ADAPTER_ID, tiny_lora)
    yield engine
    await engine.close()


@pytest.fixture(scope="session")
async def transformers_engine(tiny_llm: Path, tiny_lora: Path) -> AsyncIterator[TransformersEngine]:
    """The session's transformers engine on `tiny_llm`, with `tiny_lora` as TINY_ADAPTER_ID."""
    engine = TransformersEngine(tiny_llm, dtype="float32", device="cpu")
    await engine.start()
    await engine.add_adapter(TINY_ADAPTER_ID, tiny_lora)
    yield engine
    await engine.close()
