"""vLLM reports its queue and KV-cache use to the metrics (through a stat logger of ours)."""

from __future__ import annotations

import asyncio
import os

# vLLM reads these when its engine starts (see tests/inference/conftest.py).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from pathlib import Path

import pytest

from inference_service.engines.base import EngineLoad, EngineRequest
from inference_service.engines.vllm_engine import VllmEngine
from inference_service.sampling import SamplingSpec
from tinymodels.llm import build_llm


@pytest.mark.slow
async def test_vllm_load_stats_show_running_waiting_and_kv_cache_use(tmp_path: Path) -> None:
    engine = VllmEngine(
        build_llm(tmp_path / "tiny-llama", arch="llama"),
        dtype="float32",
        kv_cache_memory_bytes=64 * 1024 * 1024,
        max_num_seqs=2,  # so that a third request waits
        enable_lora=False,
        enforce_eager=True,
    )
    await engine.start()
    try:
        assert engine.load_stats() == EngineLoad(running=0, waiting=0, kv_cache_usage=None)  # nothing yet
        seen: list[EngineLoad] = []

        async def run(i: int) -> None:
            request = EngineRequest(
                request_id=f"load-{i}",
                prompt=f"count with me {i}",
                sampling=SamplingSpec(temperature=0.0, max_tokens=48, ignore_eos=True),
            )
            async for _ in engine.generate(request):
                seen.append(engine.load_stats())

        await asyncio.gather(*(run(i) for i in range(3)))
        assert max(s.running for s in seen) == 2
        assert max(s.waiting for s in seen) >= 1
        assert all(s.kv_cache_usage is not None for s in seen[5:])
        assert 0 < max(s.kv_cache_usage or 0.0 for s in seen) < 1
        # Idle again: nothing held, no KV cache in use.
        assert engine.load_stats() == EngineLoad(running=0, waiting=0, kv_cache_usage=0.0)
    finally:
        await engine.close()
