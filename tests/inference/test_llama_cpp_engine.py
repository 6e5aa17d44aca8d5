"""The llama.cpp engine on real GGUF files built on the spot (`tinymodels.gguf_file`).

llama-cpp-python is an optional extra that `scripts/setup.sh` installs (built from source).
Where it is missing these tests skip with a message, except with `CI=true`: CI must run them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inference_service.engines.base import (
    EngineRequest,
    FinishReason,
    ModelUnsupported,
    SamplingSpec,
    collect,
)
from inference_service.engines.transformers_engine import TransformersEngine
from server_kit import capabilities
from tinymodels.gguf_file import build_gguf
from tinymodels.llm import build_llm

if not capabilities.llama_cpp_installed():
    if os.environ.get("CI", "").lower() == "true":
        raise RuntimeError("llama-cpp-python is not installed; CI must run the llama.cpp tests (setup.sh)")
    pytest.skip("llama-cpp-python is not installed (pip install -e .[llama-cpp])", allow_module_level=True)

from inference_service.engines.llama_cpp_engine import LlamaCppEngine

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tiny Llama as safetensors (transformers) and as f32 / f16 / q8_0 GGUF files."""
    root = tmp_path_factory.mktemp("gguf")
    hf = build_llm(root / "hf", "llama", hidden_size=64)
    return {
        "hf": hf,
        "f32": build_gguf(root / "f32" / "tiny-f32.gguf", tensor_type="f32", source_dir=hf),
        "f16": build_gguf(root / "f16" / "tiny-f16.gguf", tensor_type="f16", source_dir=hf),
        "q8_0": build_gguf(root / "q8" / "tiny-q8_0.gguf", tensor_type="q8_0", source_dir=hf),
    }


@pytest.fixture(scope="module")
async def engine(models: dict[str, Path]) -> AsyncIterator[LlamaCppEngine]:
    started = LlamaCppEngine(models["f32"])
    await started.start()
    try:
        yield started
    finally:
        await started.close()


def greedy(max_tokens: int = 8, **fields: object) -> SamplingSpec:
    return SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **fields)  # type: ignore[arg-type]


async def tokens_of(engine: object, sampling: SamplingSpec, prompt: str = PROMPT) -> list[int]:
    request = EngineRequest(request_id=f"r-{id(sampling)}", prompt=prompt, sampling=sampling)
    result = await collect(engine.generate(request))  # type: ignore[attr-defined]
    return list(result.completions[0].token_ids)


async def test_greedy_tokens_equal_transformers_on_the_same_weights(
    engine: LlamaCppEngine, models: dict[str, Path]
) -> None:
    reference = TransformersEngine(models["hf"], dtype="float32", device="cpu")
    await reference.start()
    try:
        expected = await tokens_of(reference, greedy(16))
    finally:
        await reference.close()
    assert await tokens_of(engine, greedy(16)) == expected


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
async def test_quantized_files_load_and_stay_close(
    models: dict[str, Path], engine: LlamaCppEngine, kind: str
) -> None:
    """f16 and q8_0 run; greedy tokens agree with float32 on most of a short continuation."""
    quantized = LlamaCppEngine(models[kind])
    await quantized.start()
    try:
        got = await tokens_of(quantized, greedy(8))
    finally:
        await quantized.close()
    want = await tokens_of(engine, greedy(8))
    assert len(got) == 8
    assert got[:2] == want[:2]


async def test_streaming_stop_strings_and_seeds(engine: LlamaCppEngine) -> None:
    full = await collect(engine.generate(EngineRequest(request_id="a", prompt=PROMPT, sampling=greedy(16))))
    text = full.completions[0].text
    assert text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        cut = await collect(
            engine.generate(EngineRequest(request_id="b", prompt=PROMPT, sampling=greedy(16, stop=(stop,))))
        )
        assert cut.completions[0].finish_reason == FinishReason.STOP
        assert stop not in cut.completions[0].text
    sampled = SamplingSpec(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    assert await tokens_of(engine, sampled) == await tokens_of(engine, sampled)


async def test_interleaved_requests_each_get_their_own_continuation(engine: LlamaCppEngine) -> None:
    """One llama.cpp context, two prompts taking turns token by token: each as if alone."""
    alone_a = await tokens_of(engine, greedy(10), "Hello there")
    alone_b = await tokens_of(engine, greedy(10), PROMPT)
    both = await asyncio.gather(
        tokens_of(engine, greedy(10), "Hello there"), tokens_of(engine, greedy(10), PROMPT)
    )
    assert both == [alone_a, alone_b]


async def test_chat_uses_the_gguf_files_own_template(engine: LlamaCppEngine) -> None:
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "<|im_start|>user" in prompt and prompt.endswith("<|im_start|>assistant\n")


async def test_cancelling_a_stream_frees_the_engine(engine: LlamaCppEngine) -> None:
    request = EngineRequest(request_id="c", prompt=PROMPT, sampling=greedy(200))
    stream = engine.generate(request)
    await anext(stream)
    assert engine.num_unfinished_requests() == 1
    await stream.aclose()
    assert engine.num_unfinished_requests() == 0


def test_the_dry_run_is_llama_cpps_own_verdict(models: dict[str, Path], tmp_path: Path) -> None:
    LlamaCppEngine(models["f32"]).dry_run()
    import gguf

    unknown = tmp_path / "unknown.gguf"
    writer = gguf.GGUFWriter(str(unknown), "no-such-architecture")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelUnsupported) as refused:
        LlamaCppEngine(unknown).dry_run()
    assert "no-such-architecture" in refused.value.message
    assert refused.value.reason == "MODEL_UNSUPPORTED_BY_ENGINE"


def test_capabilities_come_from_the_installed_library() -> None:
    caps = capabilities.llama_cpp_capabilities()
    assert caps.engine == "llama-cpp" and caps.engine_version
    assert "llama" in caps.architectures and "qwen2" in caps.architectures
    assert "MOSTLY_Q4_K_M" in capabilities.llama_cpp_file_types()
