"""What every compatibility rule reads and returns: the model and target of a check
(`Context`, `Target`), an engine's table (`EngineTable`), a rule's `Finding`, the labels
rules speak in, and the memory estimates. The rules themselves are in `rules.py`; each
engine's table in `engines/`.

A memory estimate is weights (parameter count x bytes per parameter of the dtype or the
quantization's bits; a GGUF file's size) plus the KV cache, 2 x layers x kv_heads x head_dim
x tokens x 2 bytes (4 for float32 models); see `rules.py` (memory) for how it is judged.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from modelyard.catalog.v1 import model_pb2, worker_pb2

Model = model_pb2.Model
Worker = worker_pb2.Worker
EngineSpec = worker_pb2.EngineSpec
CompatibilityReport = worker_pb2.CompatibilityReport
RuleResult = worker_pb2.RuleResult
ModelLookup = Callable[[str], "model_pb2.Model | None"]
EngineOutcome = worker_pb2.EngineOutcome
OutcomeLookup = Callable[[str], "Sequence[worker_pb2.EngineOutcome]"]

PASS = worker_pb2.RULE_OUTCOME_PASS
WARN = worker_pb2.RULE_OUTCOME_WARN
FAIL = worker_pb2.RULE_OUTCOME_FAIL
SKIP = worker_pb2.RULE_OUTCOME_SKIP

INFERENCE = worker_pb2.WORKER_ROLE_INFERENCE
TRAINING = worker_pb2.WORKER_ROLE_TRAINING

GIB = 1024**3
MIB = 1024**2
#: Tokens of KV cache counted when neither the model nor the worker says more.
DEFAULT_CONTEXT_TOKENS = 4096
#: Above this share of the available memory the memory rule warns.
MEMORY_WARN_RATIO = 0.9


class Finding(NamedTuple):
    """What one rule found: an outcome and a message a person can act on."""

    outcome: worker_pb2.RuleOutcome.ValueType
    message: str


def passed(message: str) -> Finding:
    """A PASS finding."""
    return Finding(PASS, message)


def warned(message: str) -> Finding:
    """A WARN finding."""
    return Finding(WARN, message)


def failed(message: str) -> Finding:
    """A FAIL finding."""
    return Finding(FAIL, message)


def skipped(message: str) -> Finding:
    """A SKIP finding: the rule does not apply."""
    return Finding(SKIP, message)


@dataclass(frozen=True)
class Rule:
    """A named rule: `evaluate(context)` returns its finding."""

    name: str
    evaluate: Callable[[Context], Finding]


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory a model needs on a target, with the parts a person wants to see."""

    total: int
    detail: str


@dataclass(frozen=True)
class EngineTable:
    """What an engine can run, as data. One per engine module, registered by name.

    Lists here are the defaults used when a worker leaves the matching list of
    its capabilities empty.
    """

    name: str
    roles: frozenset[worker_pb2.WorkerRole.ValueType]
    kinds: frozenset[model_pb2.ModelKind.ValueType]
    weight_formats: frozenset[model_pb2.WeightFormat.ValueType]
    quantizations: frozenset[str] = frozenset()
    #: Architectures when the worker lists none; None when the table cannot say.
    default_architectures: Callable[[], frozenset[str]] | None = None
    #: True when `default_architectures` is the engine's whole list (a miss FAILs);
    #: False for a list of common ones (a miss only WARNs).
    default_architectures_complete: bool = False
    image_base_models: frozenset[model_pb2.ImageBaseModel.ValueType] = frozenset()
    training_methods: frozenset[str] = frozenset()
    #: KV cache tokens counted at most; None counts the whole served context.
    kv_cache_tokens: int | None = DEFAULT_CONTEXT_TOKENS
    #: Estimates memory; None uses `estimate_inference_memory`.
    estimate_memory: Callable[[Context], MemoryEstimate | None] | None = None
    #: Other names of an architecture on this engine (transformers `model_type` -> engine name).
    architecture_aliases: Mapping[str, str] = field(default_factory=dict)
    #: Said after an unsupported-architecture message (which engine to use instead).
    architecture_hint: str = ""
    #: Engine-specific rules evaluated after the common ones.
    extra_rules: tuple[Rule, ...] = ()
    #: FindWorkers prefers engines with a lower number when several can run a model
    #: (vLLM before llama.cpp before transformers).
    preference: int = 50


@dataclass(frozen=True)
class Target:
    """A registered worker or an engine spec, seen the same way by the rules."""

    name: str
    role: worker_pb2.WorkerRole.ValueType
    capabilities: worker_pb2.WorkerCapabilities
    device: worker_pb2.Device | None
    loaded: frozenset[str]

    @classmethod
    def of(cls, target: Worker | EngineSpec) -> Target:
        """Normalize a `Worker` or an `EngineSpec`."""
        device = target.device if target.HasField("device") else None
        if isinstance(target, worker_pb2.Worker):
            loaded = {m.model for m in target.loaded_models}
            loaded.update(a for m in target.loaded_models for a in m.adapters)
            return cls(target.name, target.role, target.capabilities, device, frozenset(loaded))
        return cls("", target.role, target.capabilities, device, frozenset())

    @classmethod
    def all_of(cls, target: Worker | EngineSpec) -> list[Target]:
        """One target per engine of a worker that lists several (`Worker.engines`), else just `of`."""
        first = cls.of(target)
        if not isinstance(target, worker_pb2.Worker) or len(target.engines) < 2:
            return [first]
        return [dataclasses.replace(first, capabilities=engine) for engine in target.engines]

    @property
    def engine(self) -> str:
        """Engine name as the worker reported it."""
        return self.capabilities.engine

    @property
    def engine_label(self) -> str:
        """`vllm 0.32.0`, or just `vllm` when no version was reported."""
        caps = self.capabilities
        return f"{caps.engine} {caps.engine_version}".strip()


@dataclass
class Context:
    """Everything a rule may look at. Built once per (model, target) check."""

    model: Model
    target: Target
    table: EngineTable
    engines: Sequence[EngineTable]
    requested_role: worker_pb2.WorkerRole.ValueType | None = None
    training_method: str | None = None
    lookup_model: ModelLookup | None = None
    #: Checks another model (an adapter's base) on the same target.
    check_other: Callable[[Model], CompatibilityReport] | None = None
    visited: frozenset[str] = field(default_factory=frozenset)
    #: What engines did with a model when workers tried it (model name -> outcomes).
    lookup_outcomes: OutcomeLookup | None = None

    # -- the model -----------------------------------------------------------

    @property
    def kind(self) -> model_pb2.ModelKind.ValueType:
        """The model's kind, from `kind` or else from its config."""
        return model_kind(self.model)

    @property
    def llm(self) -> model_pb2.LlmConfig | None:
        """The LLM config, when the model has one."""
        return self.model.llm if self.model.WhichOneof("config") == "llm" else None

    @property
    def image(self) -> model_pb2.ImageConfig | None:
        """The image config, when the model has one."""
        return self.model.image if self.model.WhichOneof("config") == "image" else None

    @property
    def is_adapter(self) -> bool:
        """True for an LLM LoRA adapter or an image LoRA."""
        return is_adapter(self.model)

    @property
    def weight_format(self) -> model_pb2.WeightFormat.ValueType:
        """Weight format from the config (unspecified when unknown)."""
        if self.llm is not None:
            return self.llm.weight_format
        if self.image is not None:
            return self.image.weight_format
        return model_pb2.WEIGHT_FORMAT_UNSPECIFIED

    # -- the target, with the table's defaults -------------------------------

    @property
    def role(self) -> worker_pb2.WorkerRole.ValueType:
        """The target's role; for a spec without one, the engine's only role."""
        if self.target.role != worker_pb2.WORKER_ROLE_UNSPECIFIED:
            return self.target.role
        if len(self.table.roles) == 1:
            return next(iter(self.table.roles))
        return self.requested_role or worker_pb2.WORKER_ROLE_UNSPECIFIED

    @property
    def kinds(self) -> frozenset[model_pb2.ModelKind.ValueType]:
        """Kinds the target runs."""
        return frozenset(self.target.capabilities.kinds) or self.table.kinds

    @property
    def weight_formats(self) -> frozenset[model_pb2.WeightFormat.ValueType]:
        """Weight formats the target loads."""
        return frozenset(self.target.capabilities.weight_formats) or self.table.weight_formats

    @property
    def quantizations(self) -> frozenset[str]:
        """Quantization methods the target supports, normalized."""
        declared = self.target.capabilities.quantizations
        return frozenset(normalize_quantization(q) for q in (declared or self.table.quantizations))

    @property
    def image_base_models(self) -> frozenset[model_pb2.ImageBaseModel.ValueType]:
        """Image base models the target runs."""
        return frozenset(self.target.capabilities.image_base_models) or self.table.image_base_models

    @property
    def training_methods(self) -> list[str]:
        """Training methods the target offers, in its order."""
        declared = list(self.target.capabilities.training_methods)
        return declared or sorted(self.table.training_methods)

    def max_context(self) -> int | None:
        """The target's `max_context_length`, when it declares one."""
        caps = self.target.capabilities
        return caps.max_context_length if caps.HasField("max_context_length") else None

    def served_context(self) -> int:
        """Tokens one sequence can have on the target: model context capped by the worker's."""
        llm = self.llm
        model_ctx = llm.context_length if llm is not None and llm.HasField("context_length") else None
        limits = [n for n in (model_ctx, self.max_context()) if n is not None and n > 0]
        return min(limits) if limits else DEFAULT_CONTEXT_TOKENS

    def for_model(self, model: Model) -> Context:
        """The same context for another model (an adapter's base)."""
        return dataclasses.replace(self, model=model, visited=self.visited | {self.model.name})

    @functools.cached_property
    def memory(self) -> MemoryEstimate | None:
        """Memory the model needs on this target, or None when it cannot be estimated."""
        estimator = self.table.estimate_memory or estimate_inference_memory
        return estimator(self)


# ---------------------------------------------------------------------------
# Helpers


def model_kind(model: Model) -> model_pb2.ModelKind.ValueType:
    """The model's kind, from `kind` or else from its `config` oneof."""
    if model.kind != model_pb2.MODEL_KIND_UNSPECIFIED:
        return model.kind
    return {
        "llm": model_pb2.MODEL_KIND_LLM,
        "image": model_pb2.MODEL_KIND_IMAGE,
        "audio": model_pb2.MODEL_KIND_AUDIO,
        "video": model_pb2.MODEL_KIND_VIDEO,
    }.get(model.WhichOneof("config") or "", model_pb2.MODEL_KIND_UNSPECIFIED)


def is_adapter(model: Model) -> bool:
    """True for an LLM LoRA adapter or an image LoRA."""
    config = model.WhichOneof("config")
    if config == "llm":
        return model.llm.HasField("adapter")
    if config == "image":
        return model.image.checkpoint_type == model_pb2.CHECKPOINT_TYPE_LORA
    return False


def adapter_base(model: Model) -> str:
    """The adapter's base model in the catalog (`models/...`), or "" when not known."""
    if model.WhichOneof("config") == "llm" and model.llm.adapter.base_model:
        return model.llm.adapter.base_model
    return model.parent


def normalize_quantization(method: str) -> str:
    """`compressed_tensors` and `Compressed-Tensors` both become `compressed-tensors`."""
    return method.strip().lower().replace("_", "-")


def gib(num_bytes: float) -> str:
    """Bytes as `14.2 GiB` (or `350 MiB` below one GiB)."""
    if num_bytes >= GIB:
        return f"{num_bytes / GIB:.1f} GiB"
    return f"{num_bytes / MIB:.0f} MiB"


def kind_label(kind: model_pb2.ModelKind.ValueType) -> str:
    """`LLM`, `image`, `audio`, `video`."""
    return {
        model_pb2.MODEL_KIND_LLM: "LLM",
        model_pb2.MODEL_KIND_IMAGE: "image",
        model_pb2.MODEL_KIND_AUDIO: "audio",
        model_pb2.MODEL_KIND_VIDEO: "video",
    }.get(kind, "unknown")


def role_label(role: worker_pb2.WorkerRole.ValueType) -> str:
    """`inference`, `training`."""
    return {INFERENCE: "inference", TRAINING: "training"}.get(role, "unspecified")


def format_label(fmt: model_pb2.WeightFormat.ValueType) -> str:
    """`safetensors`, `PyTorch pickle (.bin)`, `GGUF`."""
    return {
        model_pb2.WEIGHT_FORMAT_SAFETENSORS: "safetensors",
        model_pb2.WEIGHT_FORMAT_PYTORCH_BIN: "PyTorch pickle (.bin)",
        model_pb2.WEIGHT_FORMAT_GGUF: "GGUF",
    }.get(fmt, "unknown")


def base_model_label(base: model_pb2.ImageBaseModel.ValueType) -> str:
    """`SD 1.5`, `SDXL`, ..."""
    return {
        model_pb2.IMAGE_BASE_MODEL_SD_1_5: "SD 1.5",
        model_pb2.IMAGE_BASE_MODEL_SD_2_1: "SD 2.1",
        model_pb2.IMAGE_BASE_MODEL_SDXL: "SDXL",
        model_pb2.IMAGE_BASE_MODEL_SDXL_REFINER: "SDXL refiner",
        model_pb2.IMAGE_BASE_MODEL_SD_3: "SD 3",
        model_pb2.IMAGE_BASE_MODEL_FLUX: "FLUX.1",
    }.get(base, "unknown")


def checkpoint_label(kind: model_pb2.CheckpointType.ValueType) -> str:
    """`checkpoint`, `LoRA`, `embedding`, `hypernetwork`, `VAE`."""
    return {
        model_pb2.CHECKPOINT_TYPE_CHECKPOINT: "checkpoint",
        model_pb2.CHECKPOINT_TYPE_LORA: "LoRA",
        model_pb2.CHECKPOINT_TYPE_EMBEDDING: "embedding",
        model_pb2.CHECKPOINT_TYPE_HYPERNETWORK: "hypernetwork",
        model_pb2.CHECKPOINT_TYPE_VAE: "VAE",
    }.get(kind, "model")


def with_article(word: str) -> str:
    """`an inference`, `a training`, `an LLM`, `an SDXL`, `a FLUX.1`."""
    spoken_vowel = word[:1].lower() in "aeiu" or word.startswith(("LLM", "SD", "onnx"))
    return f"{'an' if spoken_vowel else 'a'} {word}"


def join_or(names: Iterable[str]) -> str:
    """`a`, `a or b`, `a, b or c`."""
    items = list(names)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


def quantization_label(quant: model_pb2.Quantization) -> str:
    """`awq (4-bit)`, `gguf MOSTLY_Q4_K_M`."""
    label = quant.method
    if quant.type:
        label += f" {quant.type}"
    if quant.HasField("bits"):
        label += f" ({quant.bits}-bit)"
    return label


def verdict_of(results: Iterable[RuleResult]) -> worker_pb2.Verdict.ValueType:
    """INCOMPATIBLE if any rule failed, COMPATIBLE_WITH_WARNINGS if any warned, else COMPATIBLE."""
    outcomes = {r.outcome for r in results}
    if FAIL in outcomes:
        return worker_pb2.VERDICT_INCOMPATIBLE
    if WARN in outcomes:
        return worker_pb2.VERDICT_COMPATIBLE_WITH_WARNINGS
    return worker_pb2.VERDICT_COMPATIBLE


def first_failure(report: CompatibilityReport) -> RuleResult | None:
    """The report's first FAIL result, or None."""
    return next((r for r in report.results if r.outcome == FAIL), None)


def engines_where(ctx: Context, predicate: Callable[[EngineTable], bool]) -> list[str]:
    """Names of registered engines for the target's role (any role when unknown) that satisfy `predicate`."""
    role = ctx.requested_role or ctx.role
    return sorted(
        t.name
        for t in ctx.engines
        if predicate(t) and (role == worker_pb2.WORKER_ROLE_UNSPECIFIED or role in t.roles)
    )


# ---------------------------------------------------------------------------
# Memory estimates

DTYPE_BYTES = {
    "float32": 4.0,
    "fp32": 4.0,
    "float": 4.0,
    "float16": 2.0,
    "fp16": 2.0,
    "half": 2.0,
    "bfloat16": 2.0,
    "bf16": 2.0,
    "float8": 1.0,
    "float8_e4m3fn": 1.0,
    "float8_e5m2": 1.0,
    "fp8": 1.0,
    "int8": 1.0,
    "uint8": 1.0,
    "int4": 0.5,
}


#: Said when a model's dtype is unknown and 16-bit weights were assumed.
ASSUMED_16_BIT = "dtype unknown, assumed 16-bit"


def bytes_per_parameter(llm: model_pb2.LlmConfig) -> tuple[float, str]:
    """Bytes per weight and what it comes from (`bfloat16`, `awq 4-bit`, ...)."""
    quant = llm.quantization
    if llm.HasField("quantization") and quant.HasField("bits") and quant.bits > 0:
        return quant.bits / 8, f"{quant.method} {quant.bits}-bit"
    dtype = llm.dtype.strip().lower().removeprefix("torch.")
    if dtype in DTYPE_BYTES:
        return DTYPE_BYTES[dtype], dtype
    return 2.0, ASSUMED_16_BIT


def weights_bytes(model: Model, *, on_cpu: bool = False) -> tuple[int, str] | None:
    """Bytes the weights take in memory and how that was derived, or None when unknown.

    Image pipelines count float16 on accelerators and float32 on a CPU (`on_cpu`).
    """
    llm = model.llm if model.WhichOneof("config") == "llm" else None
    if llm is not None:
        if llm.weight_format == model_pb2.WEIGHT_FORMAT_GGUF and model.size_bytes > 0:
            return model.size_bytes, "GGUF file"
        if llm.HasField("parameter_count") and llm.parameter_count > 0:
            per, why = bytes_per_parameter(llm)
            return int(llm.parameter_count * per), f"{llm.parameter_count / 1e9:.2f} B parameters, {why}"
    elif model.WhichOneof("config") == "image":
        image = model.image
        if image.HasField("parameter_count") and image.parameter_count > 0:
            per, dtype = (4, "float32") if on_cpu else (2, "float16")
            return image.parameter_count * per, f"{image.parameter_count / 1e9:.2f} B parameters, {dtype}"
    if model.size_bytes > 0:
        return model.size_bytes, "size of the files"
    return None


def kv_cache_bytes(llm: model_pb2.LlmConfig, tokens: int) -> int | None:
    """2 x layers x kv_heads x head_dim x tokens x dtype bytes, or None without the shape."""
    if not (
        llm.HasField("num_layers") and llm.HasField("hidden_size") and llm.HasField("num_attention_heads")
    ):
        return None
    if llm.num_attention_heads <= 0:
        return None
    head_dim = llm.head_dim if llm.HasField("head_dim") else llm.hidden_size // llm.num_attention_heads
    kv_heads = llm.num_key_value_heads if llm.HasField("num_key_value_heads") else llm.num_attention_heads
    dtype_bytes = 4 if llm.dtype.strip().lower().removeprefix("torch.") in ("float32", "fp32") else 2
    return 2 * llm.num_layers * kv_heads * head_dim * tokens * dtype_bytes


def adapter_estimate(ctx: Context, own: int | None, own_label: str) -> MemoryEstimate | None:
    """An adapter's own weights, plus its base model's needs unless the base is loaded."""
    adapter_part = own or 0
    parts = [f"adapter {gib(adapter_part)}" if own is not None else "adapter size unknown"]
    base_name = adapter_base(ctx.model)
    if not base_name:
        if own is None:
            return None
        return MemoryEstimate(
            adapter_part, f"{parts[0]} ({own_label}); applied on a pipeline the worker loads"
        )
    base = ctx.lookup_model(base_name) if ctx.lookup_model else None
    if base_name in ctx.target.loaded:
        return MemoryEstimate(adapter_part, f"{parts[0]}; base {base_name} is already loaded")
    if base is None or base.name in ctx.visited:
        if own is None:
            return None
        return MemoryEstimate(adapter_part, f"{parts[0]} ({own_label}); base model not counted (not found)")
    base_estimate = ctx.for_model(base).memory
    if base_estimate is None:
        return MemoryEstimate(adapter_part, f"{parts[0]}; base {base.name} size unknown")
    return MemoryEstimate(
        base_estimate.total + adapter_part, f"{parts[0]} + base {base.name}: {base_estimate.detail}"
    )


def estimate_inference_memory(ctx: Context) -> MemoryEstimate | None:
    """Weights plus the KV cache for the served context (capped by `kv_cache_tokens`)."""
    device = ctx.target.device
    weights = weights_bytes(
        ctx.model, on_cpu=device is not None and device.type == worker_pb2.DEVICE_TYPE_CPU
    )
    if ctx.is_adapter:
        return adapter_estimate(ctx, weights[0] if weights else None, weights[1] if weights else "")
    if weights is None:
        return None
    weights_total, why = weights
    weights_part = f"weights {gib(weights_total)}"
    if why.endswith(ASSUMED_16_BIT):
        weights_part += f" ({ASSUMED_16_BIT})"
    llm = ctx.llm
    if llm is None:
        return MemoryEstimate(weights_total, weights_part)
    tokens = ctx.served_context()
    if ctx.table.kv_cache_tokens is not None:
        tokens = min(tokens, ctx.table.kv_cache_tokens)
    kv = kv_cache_bytes(llm, tokens)
    if kv is None:
        return MemoryEstimate(
            weights_total, f"{weights_part}; KV cache not counted (layer/head shape unknown)"
        )
    return MemoryEstimate(weights_total + kv, f"{weights_part} + KV cache {gib(kv)} at {tokens} tokens")
