"""Compatibility rules shared by every engine, and the engine table they read.

A rule looks at one model and one target (a registered worker or an engine
spec) and returns a `Finding`: an outcome (PASS / WARN / FAIL / SKIP) and a
message a person can act on. Every engine evaluates the same list of common
rules (`COMMON_RULES`, in that order) plus the extra rules of its
`EngineTable`, so a report always has the same rule ids for a given engine;
a rule that does not apply answers SKIP and says why.

What an engine supports comes from two places: the worker's own
`WorkerCapabilities` (discovered at start-up, see `server_kit.capabilities`)
and, for every list the worker left empty, the defaults of the engine's table.
A list the worker declares is authoritative; a default list is only as good as
the table says (`EngineTable.default_architectures_complete`).

Decisions worth knowing:

* context_length: a worker's `max_context_length` is the longest sequence it
  serves (vLLM's `max_model_len`). When the model's context is longer the model
  still runs, capped at the worker's limit — vLLM starts fine with a smaller
  `max_model_len`, it is a larger one (beyond what the model derives) that it
  refuses — so the rule WARNs ("will be served at 4096 tokens"). It FAILs only
  for a worker that declares a limit below one token, which cannot serve
  anything. An unknown model context WARNs (nothing is guessed silently).
* memory: weights (parameter count x bytes per parameter of the dtype or the
  quantization's bits; a GGUF file's size) plus the KV cache,
  2 x layers x kv_heads x head_dim x tokens x 2 bytes (4 for float32 models).
  vLLM must fit one full-length sequence at start-up, so its KV cache is
  counted for the whole served context; other engines count
  `EngineTable.kv_cache_tokens` tokens at most (4096). The estimate is
  compared with the device's free memory (its total when free is not
  reported): FAIL when larger, WARN above 90 %. A model already loaded on the
  worker passes. Training engines estimate per method (see `peft`).
* lora: an LLM adapter needs a worker that applies LoRA, a rank within its
  `max_lora_rank`, and its base model in the catalog, which must itself pass
  every rule on the same worker.
* trust_remote_code: a model whose config maps classes to custom code fails
  on a worker that does not allow remote code.
"""

from __future__ import annotations

from collections.abc import Iterable

from catalog_service.compatibility.context import (
    DTYPE_BYTES,
    INFERENCE,
    MEMORY_WARN_RATIO,
    TRAINING,
    WARN,
    Context,
    EngineOutcome,
    Finding,
    Rule,
    adapter_base,
    base_model_label,
    checkpoint_label,
    engines_where,
    failed,
    first_failure,
    format_label,
    gib,
    join_or,
    kind_label,
    normalize_quantization,
    passed,
    quantization_label,
    role_label,
    skipped,
    warned,
    with_article,
)
from modelyard.catalog.v1 import model_pb2, worker_pb2

# ---------------------------------------------------------------------------
# The common rules


def rule_engine(ctx: Context) -> Finding:
    """The engine is known (unknown engines are reported by the checker)."""
    version = ctx.target.capabilities.engine_version
    if not version:
        return passed(f"engine {ctx.table.name} (version not reported)")
    return passed(f"engine {ctx.target.engine_label}")


def rule_model_state(ctx: Context) -> Finding:
    """Only READY models run."""
    state = ctx.model.state
    if state == model_pb2.MODEL_STATE_READY:
        return passed("model is READY")
    if state == model_pb2.MODEL_STATE_FAILED:
        error = ctx.model.error
        why = f" ({error.reason}: {error.message})" if error.reason or error.message else ""
        return failed(f"model import FAILED{why}; fix the files and import the model again")
    if state in (model_pb2.MODEL_STATE_IMPORTING, model_pb2.MODEL_STATE_VALIDATING):
        name = model_pb2.ModelState.Name(state).removeprefix("MODEL_STATE_")
        return failed(f"model is {name}; it can run once it is READY (watch it with WatchModel)")
    return failed("model has no state; only READY catalog models can run")


def rule_kind(ctx: Context) -> Finding:
    """The engine runs this kind of model."""
    kind = ctx.kind
    engine = ctx.target.engine_label
    if kind == model_pb2.MODEL_KIND_UNSPECIFIED:
        return failed(
            "model kind is not known (no config was detected); run ValidateModel to see what is missing"
        )
    if kind in ctx.kinds:
        return passed(f"{engine} runs {kind_label(kind)} models")
    runs = ", ".join(sorted(kind_label(k) for k in ctx.kinds)) or "no kinds"
    others = engines_where(ctx, lambda t: kind in t.kinds)
    hint = f"; use a {join_or(others)} worker" if others else ""
    return failed(
        f"model is {with_article(kind_label(kind))} model; "
        f"this worker runs {engine}, which runs {runs} models{hint}"
    )


def rule_role(ctx: Context) -> Finding:
    """The worker has the requested role, and one its engine has."""
    role = ctx.role
    if ctx.requested_role and role != ctx.requested_role:
        return failed(
            f"this is {with_article(role_label(role))} worker; "
            f"{with_article(role_label(ctx.requested_role))} worker is needed"
        )
    if role not in ctx.table.roles:
        roles = join_or(sorted(role_label(r) for r in ctx.table.roles))
        return failed(
            f"{ctx.table.name} is {with_article(roles)} engine but this worker registered as "
            f"{role_label(role)}; fix the worker's registration"
        )
    return passed(f"{role_label(role)} worker")


_EXAMPLE_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "MistralForCausalLM",
    "GPT2LMHeadModel",
    "llama",
    "qwen2",
    "gemma",
)


def _examples(names: frozenset[str]) -> str:
    preferred = [n for n in _EXAMPLE_ARCHITECTURES if n in names]
    rest = sorted(names - set(preferred))
    return ", ".join((preferred + rest)[:3])


def _arch_key(name: str) -> str:
    """`qwen2_moe`, `qwen2moe` and `Qwen2-MoE` compare equal."""
    return name.lower().replace("_", "").replace("-", "")


def _matches(names: Iterable[str], supported: frozenset[str]) -> bool:
    keys = {_arch_key(n) for n in supported}
    return any(n in supported or _arch_key(n) in keys for n in names)


_SCORING_TASKS = frozenset({model_pb2.LLM_TASK_REWARD_MODEL, model_pb2.LLM_TASK_SEQUENCE_CLASSIFICATION})


def rule_architecture(ctx: Context) -> Finding:
    """The engine supports the model's architecture (for GGUF files: `general.architecture`)."""
    engine = ctx.target.engine_label
    llm = ctx.llm
    if llm is None:
        if ctx.image is not None:
            return skipped("image models are matched by base model (see image_base_model)")
        return skipped(f"{kind_label(ctx.kind)} models have no LLM architecture to check")
    names = [n for n in (llm.architecture, llm.model_type) if n]
    if not names:
        if ctx.is_adapter:
            return skipped("LoRA adapter: its base model's architecture is checked (see lora)")
        return warned(
            "model architecture is unknown (config.json names no architectures); "
            f"cannot confirm that {engine} supports it"
        )
    shown = names[0]
    if ctx.role == INFERENCE and llm.task in _SCORING_TASKS:
        what = "a reward model" if llm.task == model_pb2.LLM_TASK_REWARD_MODEL else "a sequence classifier"
        return failed(
            f"{shown} is {what}: it scores sequences and does not generate text, so {engine} cannot "
            "serve it for generation; use it as a GRPO job's reward model (grpo.reward_model)"
        )
    names += [ctx.table.architecture_aliases[n] for n in names if n in ctx.table.architecture_aliases]
    declared = frozenset(ctx.target.capabilities.architectures)
    if declared:
        if _matches(names, declared):
            return passed(f"{engine} supports {shown}")
        hint = f"; {ctx.table.architecture_hint}" if ctx.table.architecture_hint else ""
        return failed(
            f"architecture {shown} is not supported by {engine} "
            f"(supported: {len(declared)} architectures, e.g. {_examples(declared)}){hint}"
        )
    defaults = ctx.table.default_architectures() if ctx.table.default_architectures else None
    if defaults is None:
        return warned(
            f"the worker did not list its architectures; cannot confirm that {engine} supports {shown}"
        )
    if _matches(names, defaults):
        return passed(f"{engine} supports {shown} (built-in list; the worker did not list its architectures)")
    if ctx.table.default_architectures_complete:
        hint = f"; {ctx.table.architecture_hint}" if ctx.table.architecture_hint else ""
        return failed(
            f"architecture {shown} is not supported by {engine} "
            f"(supported: {len(defaults)} architectures, e.g. {_examples(defaults)}){hint}"
        )
    return warned(
        f"{shown} is not among {ctx.table.name}'s common architectures and the worker did not list its own; "
        "it may fail to load"
    )


def rule_weight_format(ctx: Context) -> Finding:
    """The engine loads the model's weight format."""
    fmt = ctx.weight_format
    engine = ctx.target.engine_label
    if fmt == model_pb2.WEIGHT_FORMAT_UNSPECIFIED:
        return warned(f"weight format is unknown; cannot confirm that {engine} loads it")
    if fmt in ctx.weight_formats:
        return passed(f"{engine} loads {format_label(fmt)} weights")
    loads = ", ".join(sorted(format_label(f) for f in ctx.weight_formats)) or "nothing"
    if fmt == model_pb2.WEIGHT_FORMAT_PYTORCH_BIN:
        return failed(
            "pickle weights (.bin/.pt) can run code when loaded and this worker does not allow them; "
            "convert the model to safetensors or allow pickle on a worker you trust"
        )
    kind = ctx.kind
    others = engines_where(ctx, lambda t: fmt in t.weight_formats and kind in t.kinds)
    if others:
        return failed(
            f"{format_label(fmt)} weights need a {join_or(others)} worker; "
            f"this worker runs {engine}, which loads {loads}"
        )
    return failed(
        f"no {role_label(ctx.requested_role or ctx.role)} engine loads {format_label(fmt)} weights; "
        f"this worker runs {engine}, which loads {loads}: import the model in another format"
    )


def rule_quantization(ctx: Context) -> Finding:
    """The engine supports the model's quantization method."""
    llm = ctx.llm
    if llm is None or not llm.HasField("quantization") or not llm.quantization.method:
        dtype = f" ({llm.dtype})" if llm is not None and llm.dtype else ""
        return skipped(f"weights are not quantized{dtype}")
    quant = llm.quantization
    label = quantization_label(quant)
    engine = ctx.target.engine_label
    if (
        llm.weight_format == model_pb2.WEIGHT_FORMAT_GGUF
        and model_pb2.WEIGHT_FORMAT_GGUF not in ctx.weight_formats
    ):
        return skipped(f"{label}: GGUF quantization comes with the GGUF format (see weight_format)")
    supported = ctx.quantizations
    if normalize_quantization(quant.method) in supported:
        return passed(f"{engine} supports {label} quantization")
    offered = ", ".join(sorted(supported)) if supported else "none"
    return failed(
        f"{label} quantized weights are not supported by {engine} on this worker (supported: {offered}); "
        f"use an unquantized variant or a worker that supports {quant.method}"
    )


def rule_context_length(ctx: Context) -> Finding:
    """The model's context against the worker's `max_context_length` (WARN when capped)."""
    llm = ctx.llm
    if llm is None:
        return skipped(f"{kind_label(ctx.kind)} models have no context length")
    if ctx.role == TRAINING:
        return skipped("training worker: sequences are cut to the training job's max_length")
    worker_max = ctx.max_context()
    if worker_max is not None and worker_max < 1:
        return failed(f"worker declares max_context_length {worker_max}; it cannot serve any prompt")
    model_ctx = llm.context_length if llm.HasField("context_length") else None
    if model_ctx is None:
        if ctx.is_adapter:
            return skipped("LoRA adapter: served with its base model's context")
        if worker_max is None:
            return skipped("neither the model nor the worker declares a context length")
        return warned(f"model's context length is unknown; the worker serves at most {worker_max} tokens")
    if worker_max is None:
        return passed(f"served at the model's full {model_ctx} tokens (the worker sets no limit)")
    if model_ctx <= worker_max:
        return passed(f"served at the model's full {model_ctx} tokens (the worker allows {worker_max})")
    return warned(
        f"model supports {model_ctx} tokens; this worker serves at most {worker_max}, "
        f"so it will be served at {worker_max} tokens and longer prompts are rejected"
    )


def rule_memory(ctx: Context) -> Finding:
    """Estimated memory (weights + KV cache) against the device's free memory."""
    estimate = ctx.memory
    if ctx.model.name and ctx.model.name in ctx.target.loaded:
        return passed("model is already loaded on this worker")
    if estimate is None:
        return warned("model size is unknown (no parameter count or file sizes); cannot estimate its memory")
    need = f"model needs ~{gib(estimate.total)} ({estimate.detail})"
    device = ctx.target.device
    if device is None or device.memory_bytes <= 0:
        return skipped(f"{need}; the worker did not report its device memory")
    if device.free_memory_bytes > 0:
        available = device.free_memory_bytes
        has = f"worker has {gib(available)} free of {gib(device.memory_bytes)}"
    else:
        available = device.memory_bytes
        has = f"worker has {gib(available)} (free memory not reported)"
    if estimate.total > device.memory_bytes:
        return failed(
            f"{need}; {has}: more than the whole device; use a quantized variant or a larger device"
        )
    if estimate.total > available:
        return failed(f"{need}; {has}: unload models from this worker or pick another one")
    if estimate.total > MEMORY_WARN_RATIO * available:
        return warned(f"{need}; {has}: over 90% of it, little room left for batches")
    return passed(f"{need}; {has}")


def rule_lora(ctx: Context) -> Finding:
    """An adapter: LoRA support, rank within the limit, base model present and runnable here."""
    if not ctx.is_adapter:
        return skipped("model is not an adapter")
    caps = ctx.target.capabilities
    engine = ctx.target.engine_label
    if not caps.supports_lora:
        return failed(
            f"model is a LoRA adapter; this worker ({engine}) does not apply LoRA adapters "
            "(start it with LoRA enabled or pick another worker)"
        )
    rank: int | None = None
    if ctx.llm is not None and ctx.llm.adapter.HasField("rank"):
        rank = ctx.llm.adapter.rank
    elif ctx.image is not None and ctx.image.HasField("lora_rank"):
        rank = ctx.image.lora_rank
    if rank is not None and caps.HasField("max_lora_rank") and rank > caps.max_lora_rank:
        return failed(
            f"adapter rank {rank} exceeds this worker's max LoRA rank {caps.max_lora_rank}; "
            f"raise max_lora_rank to {rank} or more on the worker, or pick another one"
        )
    rank_note = f"rank {rank}" if rank is not None else "rank unknown"
    base_name = adapter_base(ctx.model)
    if ctx.image is not None and not base_name:
        return passed(f"LoRA ({rank_note}) applies on the worker's pipeline (see image_base_model)")
    if not base_name:
        declared = ctx.llm.adapter.base_model_name_or_path if ctx.llm is not None else ""
        named = f" (adapter_config.json names {declared!r})" if declared else ""
        return failed(
            f"adapter's base model is not in the catalog{named}; "
            "import the base model, then validate the adapter again"
        )
    if ctx.lookup_model is None:
        return warned(f"cannot check the adapter's base model {base_name} (no catalog lookup given)")
    if base_name in ctx.visited or base_name == ctx.model.name:
        return failed(f"adapter's base model chain loops back to {base_name}; fix the adapter's parent")
    base = ctx.lookup_model(base_name)
    if base is None:
        return failed(f"adapter's base model {base_name} is not in the catalog; import it first")
    if ctx.check_other is None:
        return warned(f"cannot check the adapter's base model {base_name} on this worker")
    report = ctx.check_other(base)
    failure = first_failure(report)
    if failure is not None:
        return failed(
            f"adapter's base model {base_name} cannot run on this worker: {failure.rule}: {failure.message}"
        )
    warning = next((r for r in report.results if r.outcome == WARN), None)
    if warning is not None:
        return warned(
            f"adapter ({rank_note}) applies on {base_name}, with a caveat: {warning.rule}: {warning.message}"
        )
    base_arch = base.llm.architecture if base.WhichOneof("config") == "llm" and base.llm.architecture else ""
    arch = f" ({base_arch})" if base_arch else ""
    return passed(f"adapter ({rank_note}) applies on {base_name}{arch}, which this worker runs")


def rule_trust_remote_code(ctx: Context) -> Finding:
    """A model that needs custom code runs only on a worker that allows remote code."""
    llm = ctx.llm
    if llm is None or not llm.requires_remote_code:
        return skipped("model needs no remote code")
    if ctx.target.capabilities.allows_remote_code:
        return passed("model needs trust_remote_code; this worker allows remote code")
    return failed(
        "model needs trust_remote_code (its config.json maps classes to custom code through auto_map) "
        "and this worker does not allow remote code; use a worker that allows it, only for code you trust"
    )


def rule_image_base_model(ctx: Context) -> Finding:
    """An image model's base family (SD 1.5, SDXL, ...) against the worker's pipelines."""
    image = ctx.image
    if image is None:
        return skipped("not an image model")
    what = checkpoint_label(image.checkpoint_type)
    base = image.base_model
    supported = ctx.image_base_models
    runs = ", ".join(base_model_label(b) for b in sorted(supported)) or "no image base models"
    if base == model_pb2.IMAGE_BASE_MODEL_UNSPECIFIED:
        return warned(
            f"the {what}'s base model (SD 1.5, SDXL, ...) is unknown; cannot confirm it fits {runs}"
        )
    label = base_model_label(base)
    if base in supported:
        return passed(f"{label} {what}; this worker runs {runs}")
    return failed(
        f"{with_article(label)} {what} needs {with_article(label)}-capable {ctx.table.name} worker; "
        f"this worker runs {runs}"
    )


_LORA_STYLE = frozenset({"lora", "qlora", "dpo", "orpo", "kto", "grpo"})


def _method_problem(ctx: Context, method: str) -> str:
    """Why `method` cannot train this model ("" when it can)."""
    llm = ctx.llm
    if llm is None:
        return ""
    if ctx.is_adapter and method not in _LORA_STYLE:
        return f"{ctx.model.name} is a LoRA adapter; {method} training needs a base model; train its base"
    if llm.HasField("quantization") and llm.quantization.method and method not in _LORA_STYLE:
        return (
            f"quantized weights ({quantization_label(llm.quantization)}) cannot be trained with {method}; "
            "train a LoRA on them or use the unquantized model"
        )
    return ""


def rule_training_method(ctx: Context) -> Finding:
    """A training worker offers a method (the requested one, if any) that applies to the model."""
    if ctx.role != TRAINING:
        return skipped(f"{role_label(ctx.role)} worker; no training")
    if ctx.llm is None:
        return skipped(f"training methods apply to LLMs, not {kind_label(ctx.kind)} models")
    methods = ctx.training_methods
    if ctx.training_method:
        method = ctx.training_method.lower()
        if method not in methods:
            offered = ", ".join(methods) or "none"
            cuda = "; QLoRA needs a CUDA worker" if method == "qlora" else ""
            return failed(f"this trainer does not offer {method} training (offers: {offered}){cuda}")
        problem = _method_problem(ctx, method)
        return failed(problem) if problem else passed(f"can train with {method}")
    if not methods:
        return failed("this trainer lists no training methods; fix its registration")
    usable = [m for m in methods if not _method_problem(ctx, m)]
    if not usable:
        return failed(_method_problem(ctx, methods[0]))
    return passed(f"can train with: {', '.join(usable)}")


def _dtype_key(name: str) -> str:
    """`torch.bfloat16`, `bf16` and `BFloat16` all become `bfloat16`."""
    text = name.strip().lower().removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
    return aliases.get(text, text)


def rule_attention(ctx: Context) -> Finding:
    """The model's attention head size and dtype against what the engine's attention backend
    reports it accepts on this device (`attention_head_sizes`, `dtypes` of the worker)."""
    llm = ctx.llm
    if llm is None:
        return skipped(f"{kind_label(ctx.kind)} models are not checked for attention kernels")
    if ctx.is_adapter:
        return skipped("LoRA adapter: its base model's attention is checked (see lora)")
    caps = ctx.target.capabilities
    engine = ctx.target.engine_label
    sizes = sorted(set(caps.attention_head_sizes))
    dtypes = [_dtype_key(d) for d in caps.dtypes]
    notes: list[str] = []
    if sizes and not llm.HasField("head_dim") and not llm.HasField("num_attention_heads"):
        return skipped("the model states no attention heads (a state-space model): no attention kernel runs")
    if sizes:
        if not llm.HasField("head_dim"):
            return warned(
                f"model's attention head size is unknown; {engine} accepts head sizes "
                f"{', '.join(map(str, sizes))} on this device"
            )
        if llm.head_dim not in sizes:
            return failed(
                f"attention head size {llm.head_dim} is not supported by {engine}'s attention on this device "
                f"(it accepts {', '.join(map(str, sizes))}); another engine (transformers) can serve it"
            )
        notes.append(f"head size {llm.head_dim}")
    model_dtype = _dtype_key(llm.dtype) if llm.dtype else ""
    if dtypes and model_dtype and model_dtype in DTYPE_BYTES and model_dtype not in dtypes:
        return warned(
            f"weights are {model_dtype}; {engine} computes in {', '.join(dtypes)} on this device, "
            f"so they are cast to {dtypes[0]}"
        )
    if model_dtype and dtypes:
        notes.append(model_dtype)
    if not notes:
        return skipped(f"{engine} reports no attention limits on this device")
    return passed(f"{engine} accepts {' and '.join(notes)} on this device")


def _outcome_applies(ctx: Context, outcome: EngineOutcome) -> bool:
    caps = ctx.target.capabilities
    device = ctx.target.device
    return (
        outcome.engine == caps.engine
        and outcome.engine_version == caps.engine_version
        and (device is None or outcome.device_type in (device.type, worker_pb2.DEVICE_TYPE_UNSPECIFIED))
        and (not outcome.model_etag or outcome.model_etag == ctx.model.etag)
    )


_STAGE_LABELS = {
    worker_pb2.ENGINE_OUTCOME_STAGE_DRY_RUN: "its dry run",
    worker_pb2.ENGINE_OUTCOME_STAGE_LOAD: "load",
    worker_pb2.ENGINE_OUTCOME_STAGE_FIRST_STEP: "its first generation step",
}
_STAGE_VERBS = {
    worker_pb2.ENGINE_OUTCOME_STAGE_DRY_RUN: "validated",
    worker_pb2.ENGINE_OUTCOME_STAGE_LOAD: "loaded",
    worker_pb2.ENGINE_OUTCOME_STAGE_FIRST_STEP: "loaded and generated with",
}


def rule_observed(ctx: Context) -> Finding:
    """What this engine (same version, same kind of device) did when a worker tried the model:
    a model-caused failure FAILs until the model or the engine version changes."""
    if ctx.lookup_outcomes is None or not ctx.model.name:
        return skipped("no record of engines trying this model was consulted")
    engine = ctx.target.engine_label
    outcomes = [o for o in ctx.lookup_outcomes(ctx.model.name) if _outcome_applies(ctx, o)]
    failure = next((o for o in outcomes if not o.supported), None)
    if failure is not None:
        where = _STAGE_LABELS.get(failure.stage, "a run")
        by = f" on {failure.worker}" if failure.worker else ""
        return failed(f"{engine} failed on this model at {where}{by}: {failure.message}")
    success = next((o for o in outcomes if o.supported), None)
    if success is not None:
        verb = _STAGE_VERBS.get(success.stage, "ran")
        by = f" on {success.worker}" if success.worker else ""
        return passed(f"{engine} {verb} this model{by}")
    return skipped(f"not tried on {engine} yet")


COMMON_RULES: tuple[Rule, ...] = (
    Rule("engine", rule_engine),
    Rule("model_state", rule_model_state),
    Rule("kind", rule_kind),
    Rule("role", rule_role),
    Rule("architecture", rule_architecture),
    Rule("weight_format", rule_weight_format),
    Rule("quantization", rule_quantization),
    Rule("context_length", rule_context_length),
    Rule("memory", rule_memory),
    Rule("lora", rule_lora),
    Rule("trust_remote_code", rule_trust_remote_code),
    Rule("image_base_model", rule_image_base_model),
    Rule("training_method", rule_training_method),
    Rule("attention", rule_attention),
    Rule("observed", rule_observed),
)
