"""Compatibility rules and FindWorkers ranking.

The rules are tested one by one on hand-built models and workers; the
acceptance matrix then registers a fleet described by the real capabilities
discovered from the installed vLLM, transformers, peft and diffusers (plus a
llama-cpp worker described by hand) and checks, model by model, who can run
what and what the reasons say. A last group detects real tiny models built on
the spot and routes them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from catalog_service.compatibility import check, engine_names, rule_names
from catalog_service.ranking import rank
from modelyard.catalog.v1 import model_pb2, worker_pb2
from server_kit import capabilities

GIB = 1024**3
MIB = 1024**2

LLM = model_pb2.MODEL_KIND_LLM
IMAGE = model_pb2.MODEL_KIND_IMAGE
SAFETENSORS = model_pb2.WEIGHT_FORMAT_SAFETENSORS
GGUF = model_pb2.WEIGHT_FORMAT_GGUF
BIN = model_pb2.WEIGHT_FORMAT_PYTORCH_BIN
INFERENCE = worker_pb2.WORKER_ROLE_INFERENCE
TRAINING = worker_pb2.WORKER_ROLE_TRAINING
SDXL = model_pb2.IMAGE_BASE_MODEL_SDXL
SD15 = model_pb2.IMAGE_BASE_MODEL_SD_1_5

COMPATIBLE = worker_pb2.VERDICT_COMPATIBLE
WARNINGS = worker_pb2.VERDICT_COMPATIBLE_WITH_WARNINGS
INCOMPATIBLE = worker_pb2.VERDICT_INCOMPATIBLE


# ---------------------------------------------------------------------------
# Builders


def llm(
    name: str = "models/llama-3-2-1b",
    *,
    architecture: str = "LlamaForCausalLM",
    model_type: str = "llama",
    params: int | None = 1_235_814_400,
    dtype: str = "bfloat16",
    context: int | None = 131072,
    layers: int = 16,
    hidden: int = 2048,
    heads: int = 32,
    kv_heads: int = 8,
    fmt: model_pb2.WeightFormat.ValueType = SAFETENSORS,
    quant: model_pb2.Quantization | None = None,
    state: model_pb2.ModelState.ValueType = model_pb2.MODEL_STATE_READY,
    remote_code: bool = False,
    size_bytes: int = 0,
) -> model_pb2.Model:
    """A READY LLM entry as the catalog stores it (defaults: Llama 3.2 1B)."""
    config = model_pb2.LlmConfig(
        architecture=architecture,
        model_type=model_type,
        weight_format=fmt,
        dtype=dtype,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        requires_remote_code=remote_code,
    )
    if params is not None:
        config.parameter_count = params
    if context is not None:
        config.context_length = context
    if quant is not None:
        config.quantization.CopyFrom(quant)
    return model_pb2.Model(name=name, kind=LLM, state=state, llm=config, size_bytes=size_bytes)


def gguf_model(name: str = "models/llama-3-1-8b-q4", *, context: int = 8192) -> model_pb2.Model:
    """Llama 3.1 8B as a Q4_K_M GGUF file (4.6 GiB)."""
    return llm(
        name,
        params=8_030_261_248,
        dtype="q4_k_m",
        context=context,
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=8,
        fmt=GGUF,
        quant=model_pb2.Quantization(method="gguf", type="MOSTLY_Q4_K_M", bits=4),
        size_bytes=4_920_739_232,
    )


def adapter(
    name: str = "models/llama-1b-lora",
    *,
    base: str = "models/llama-3-2-1b",
    rank: int = 8,
    base_name_or_path: str = "meta-llama/Llama-3.2-1B",
    architecture: str = "LlamaForCausalLM",
) -> model_pb2.Model:
    """A LoRA adapter whose base the catalog resolved to `base` ("" when it did not)."""
    config = model_pb2.LlmConfig(
        architecture=architecture,
        model_type="llama",
        weight_format=SAFETENSORS,
        dtype="float32",
        parameter_count=5_636_096,
        adapter=model_pb2.AdapterInfo(
            adapter_type="LORA",
            base_model_name_or_path=base_name_or_path,
            base_model=base,
            rank=rank,
            alpha=16,
            target_modules=["q_proj", "v_proj"],
        ),
    )
    return model_pb2.Model(
        name=name, kind=LLM, state=model_pb2.MODEL_STATE_READY, llm=config, parent=base, size_bytes=22_552_000
    )


def image(
    name: str = "models/sdxl-base",
    *,
    base: model_pb2.ImageBaseModel.ValueType = SDXL,
    checkpoint: model_pb2.CheckpointType.ValueType = model_pb2.CHECKPOINT_TYPE_CHECKPOINT,
    params: int = 3_470_000_000,
    lora_rank: int | None = None,
) -> model_pb2.Model:
    """An image model (default: the SDXL base pipeline)."""
    config = model_pb2.ImageConfig(
        base_model=base, checkpoint_type=checkpoint, weight_format=SAFETENSORS, parameter_count=params
    )
    if lora_rank is not None:
        config.lora_rank = lora_rank
    return model_pb2.Model(name=name, kind=IMAGE, state=model_pb2.MODEL_STATE_READY, image=config)


def worker(
    name: str,
    caps: worker_pb2.WorkerCapabilities,
    *,
    role: worker_pb2.WorkerRole.ValueType = INFERENCE,
    memory: int = 24 * GIB,
    free: int = 20 * GIB,
    device_type: worker_pb2.DeviceType.ValueType = worker_pb2.DEVICE_TYPE_CPU,
    state: worker_pb2.WorkerState.ValueType = worker_pb2.WORKER_STATE_HEALTHY,
    loaded: Iterable[str] = (),
    running: int = 0,
    queued: int = 0,
) -> worker_pb2.Worker:
    """A registered worker."""
    return worker_pb2.Worker(
        name=name,
        role=role,
        capabilities=caps,
        device=worker_pb2.Device(
            type=device_type, name="test device", count=1, memory_bytes=memory, free_memory_bytes=free
        ),
        loaded_models=[worker_pb2.LoadedModel(model=m) for m in loaded],
        load=worker_pb2.WorkerLoad(running=running, queued=queued),
        state=state,
    )


def vllm_caps(**overrides: object) -> worker_pb2.WorkerCapabilities:
    """A vLLM worker on a CPU as it could register (hand-written, a few architectures)."""
    caps = worker_pb2.WorkerCapabilities(
        engine="vllm",
        engine_version="0.32.0",
        kinds=[LLM],
        architectures=["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"],
        weight_formats=[SAFETENSORS],
        quantizations=["awq", "gptq", "compressed-tensors"],
        max_context_length=4096,
        supports_lora=True,
        max_lora_rank=16,
    )
    for key, value in overrides.items():
        if isinstance(value, list):
            field = getattr(caps, key)
            del field[:]
            field.extend(value)
        else:
            setattr(caps, key, value)
    return caps


def llama_cpp_caps() -> worker_pb2.WorkerCapabilities:
    """A llama.cpp server: GGUF only, architectures left to the engine table."""
    return worker_pb2.WorkerCapabilities(
        engine="llama-cpp",
        engine_version="b5000",
        kinds=[LLM],
        weight_formats=[GGUF],
        quantizations=["gguf"],
        max_context_length=8192,
    )


def trainer_caps(methods: Iterable[str] = ("lora", "full", "dpo")) -> worker_pb2.WorkerCapabilities:
    """A peft trainer on a CPU."""
    return worker_pb2.WorkerCapabilities(
        engine="peft",
        engine_version="0.21.2",
        kinds=[LLM],
        weight_formats=[SAFETENSORS],
        supports_lora=True,
        training_methods=list(methods),
    )


def diffusers_caps(
    bases: Iterable[model_pb2.ImageBaseModel.ValueType] = (SD15, SDXL),
) -> worker_pb2.WorkerCapabilities:
    """A diffusers worker running the given pipeline families."""
    return worker_pb2.WorkerCapabilities(
        engine="diffusers",
        engine_version="0.42.1",
        kinds=[IMAGE],
        weight_formats=[SAFETENSORS],
        image_base_models=list(bases),
        supports_lora=True,
    )


def catalog(*models: model_pb2.Model) -> Callable[[str], model_pb2.Model | None]:
    """A `lookup_model` over `models`."""
    by_name = {m.name: m for m in models}
    return by_name.get


def result(report: worker_pb2.CompatibilityReport, rule: str) -> worker_pb2.RuleResult:
    """The one result of `rule` in `report`."""
    found = [r for r in report.results if r.rule == rule]
    assert len(found) == 1, f"{rule}: {[r.rule for r in report.results]}"
    return found[0]


def outcome(report: worker_pb2.CompatibilityReport, rule: str) -> str:
    """`PASS`, `WARN`, `FAIL` or `SKIP`."""
    return worker_pb2.RuleOutcome.Name(result(report, rule).outcome).removeprefix("RULE_OUTCOME_")


def failures(report: worker_pb2.CompatibilityReport) -> list[str]:
    """Rules that failed."""
    return [r.rule for r in report.results if r.outcome == worker_pb2.RULE_OUTCOME_FAIL]


VLLM = worker("workers/vllm", vllm_caps())


# ---------------------------------------------------------------------------
# The report's shape


def test_every_engine_reports_the_same_rules_whatever_the_model() -> None:
    models = [llm(), gguf_model(), adapter(), image(), llm(architecture="FooForCausalLM")]
    lookup = catalog(llm())
    for engine in engine_names():
        caps = worker_pb2.WorkerCapabilities(engine=engine)
        names = {
            tuple(
                r.rule
                for r in check(m, worker_pb2.EngineSpec(capabilities=caps), lookup_model=lookup).results
            )
            for m in models
        }
        assert names == {tuple(rule_names(engine))}, engine
    assert "checkpoint_type" in rule_names("diffusers")
    assert "checkpoint_type" not in rule_names("vllm")


def test_registered_engines() -> None:
    assert engine_names() == ["diffusers", "llama-cpp", "peft", "transformers", "vllm"]


def test_unknown_engine_fails_the_engine_rule_and_checks_nothing_else() -> None:
    report = check(llm(), worker("workers/x", worker_pb2.WorkerCapabilities(engine="tensorrt-llm")))
    assert report.verdict == INCOMPATIBLE
    assert report.engine == "tensorrt-llm"
    engine = result(report, "engine")
    assert outcome(report, "engine") == "FAIL"
    assert "unknown engine 'tensorrt-llm'" in engine.message
    assert "diffusers, llama-cpp, peft, transformers, vllm" in engine.message
    assert {outcome(report, r) for r in rule_names("tensorrt-llm")[1:]} == {"SKIP"}


def test_report_names_model_worker_engine_and_memory() -> None:
    report = check(llm(), VLLM)
    assert (report.model, report.worker, report.engine) == ("models/llama-3-2-1b", "workers/vllm", "vllm")
    spec_report = check(llm(), worker_pb2.EngineSpec(capabilities=vllm_caps()))
    assert spec_report.worker == ""
    assert report.HasField("estimated_memory_bytes")


# ---------------------------------------------------------------------------
# Rules, one by one


def test_model_state_only_ready_models_run() -> None:
    assert outcome(check(llm(), VLLM), "model_state") == "PASS"
    importing = check(llm(state=model_pb2.MODEL_STATE_IMPORTING), VLLM)
    assert outcome(importing, "model_state") == "FAIL"
    assert "model is IMPORTING" in result(importing, "model_state").message
    broken = llm(state=model_pb2.MODEL_STATE_FAILED)
    broken.error.reason, broken.error.message = "CORRUPT_JSON", "config.json line 3"
    message = result(check(broken, VLLM), "model_state").message
    assert "FAILED (CORRUPT_JSON: config.json line 3)" in message
    assert "import the model again" in message


def test_kind_points_to_an_engine_that_runs_the_kind() -> None:
    report = check(image(), VLLM)
    assert outcome(report, "kind") == "FAIL"
    assert result(report, "kind").message == (
        "model is an image model; this worker runs vllm 0.32.0, which runs LLM models; use a diffusers worker"
    )
    unknown = model_pb2.Model(name="models/blob", state=model_pb2.MODEL_STATE_READY)
    assert "ValidateModel" in result(check(unknown, VLLM), "kind").message
    assert outcome(check(llm(), VLLM), "kind") == "PASS"


def test_role_requested_versus_worker_role() -> None:
    trainer = worker("workers/trainer", trainer_caps(), role=TRAINING)
    report = check(llm(), trainer, role=INFERENCE)
    assert outcome(report, "role") == "FAIL"
    assert result(report, "role").message == "this is a training worker; an inference worker is needed"
    assert outcome(check(llm(), trainer), "role") == "PASS"
    assert outcome(check(llm(), trainer, role=TRAINING), "role") == "PASS"
    misregistered = worker("workers/odd", vllm_caps(), role=TRAINING)
    assert "fix the worker's registration" in result(check(llm(), misregistered), "role").message


def test_role_of_an_engine_spec_defaults_to_the_engine_role() -> None:
    spec = worker_pb2.EngineSpec(capabilities=trainer_caps())
    assert outcome(check(llm(), spec, role=TRAINING), "role") == "PASS"
    assert outcome(check(llm(), spec, role=INFERENCE), "role") == "FAIL"


def test_architecture_against_the_workers_list() -> None:
    assert result(check(llm(), VLLM), "architecture").message == "vllm 0.32.0 supports LlamaForCausalLM"
    report = check(llm(architecture="Foo2ForCausalLM", model_type="foo2"), VLLM)
    assert outcome(report, "architecture") == "FAIL"
    message = result(report, "architecture").message
    assert message.startswith("architecture Foo2ForCausalLM is not supported by vllm 0.32.0")
    assert (
        "(supported: 3 architectures, e.g. LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)" in message
    )
    assert "a transformers worker can run architectures vLLM lacks" in message


def test_a_reward_model_is_not_routed_for_generation() -> None:
    reward = llm(architecture="LlamaForSequenceClassification")
    reward.llm.task = model_pb2.LLM_TASK_REWARD_MODEL
    report = check(reward, VLLM)
    assert outcome(report, "architecture") == "FAIL"
    assert (
        "is a reward model: it scores sequences and does not generate text"
        in result(report, "architecture").message
    )


def test_architecture_without_a_workers_list_uses_the_engine_table() -> None:
    bare_vllm = worker_pb2.EngineSpec(capabilities=worker_pb2.WorkerCapabilities(engine="vllm"))
    assert outcome(check(llm(), bare_vllm), "architecture") == "PASS"
    assert "built-in list" in result(check(llm(), bare_vllm), "architecture").message
    # vLLM's table is a list of common architectures: a miss only warns.
    rare = check(llm(architecture="Foo2ForCausalLM"), bare_vllm)
    assert outcome(rare, "architecture") == "WARN"
    assert "may fail to load" in result(rare, "architecture").message
    # transformers' table is its whole auto mapping: a miss fails.
    bare_transformers = worker_pb2.EngineSpec(
        capabilities=worker_pb2.WorkerCapabilities(engine="transformers")
    )
    assert (
        outcome(
            check(llm(architecture="GPTNeoForCausalLM", model_type="gpt_neo"), bare_transformers),
            "architecture",
        )
        == "PASS"
    )
    assert (
        outcome(
            check(llm(architecture="Foo2ForCausalLM", model_type="foo2"), bare_transformers), "architecture"
        )
        == "FAIL"
    )


def test_architecture_of_gguf_files_matches_llama_cpp_names() -> None:
    llama_cpp = worker("workers/llama-cpp", llama_cpp_caps())
    assert outcome(check(gguf_model(), llama_cpp), "architecture") == "PASS"
    # GGUF `qwen2moe` is transformers `qwen2_moe`; `phi2` is `phi`.
    moe = gguf_model()
    moe.llm.architecture, moe.llm.model_type = "Qwen2MoeForCausalLM", "qwen2_moe"
    assert outcome(check(moe, llama_cpp), "architecture") == "PASS"
    phi = gguf_model()
    phi.llm.architecture, phi.llm.model_type = "PhiForCausalLM", "phi"
    assert outcome(check(phi, llama_cpp), "architecture") == "PASS"
    made_up = gguf_model()
    made_up.llm.architecture, made_up.llm.model_type = "", "foo9"
    assert outcome(check(made_up, llama_cpp), "architecture") == "FAIL"


def test_architecture_unknown_warns_and_adapters_defer_to_their_base() -> None:
    assert outcome(check(llm(architecture="", model_type=""), VLLM), "architecture") == "WARN"
    no_arch_adapter = adapter(architecture="")
    no_arch_adapter.llm.model_type = ""
    assert outcome(check(no_arch_adapter, VLLM, lookup_model=catalog(llm())), "architecture") == "SKIP"
    assert outcome(check(image(), VLLM), "architecture") == "SKIP"


def test_weight_format_names_the_engine_that_loads_it() -> None:
    report = check(gguf_model(), VLLM)
    assert outcome(report, "weight_format") == "FAIL"
    assert result(report, "weight_format").message == (
        "GGUF weights need a llama-cpp worker; this worker runs vllm 0.32.0, which loads safetensors"
    )
    on_llama_cpp = check(llm(), worker("workers/llama-cpp", llama_cpp_caps()))
    assert result(on_llama_cpp, "weight_format").message == (
        "safetensors weights need a transformers or vllm worker; "
        "this worker runs llama-cpp b5000, which loads GGUF"
    )
    on_trainer = check(gguf_model(), worker("workers/trainer", trainer_caps(), role=TRAINING))
    assert "no training engine loads GGUF weights" in result(on_trainer, "weight_format").message
    pickle = check(llm(fmt=BIN), VLLM)
    assert outcome(pickle, "weight_format") == "FAIL"
    assert "convert the model to safetensors" in result(pickle, "weight_format").message
    allowed = worker("workers/vllm-pickle", vllm_caps(weight_formats=[SAFETENSORS, BIN]))
    assert outcome(check(llm(fmt=BIN), allowed), "weight_format") == "PASS"


def test_quantization_methods() -> None:
    assert outcome(check(llm(), VLLM), "quantization") == "SKIP"
    assert result(check(llm(), VLLM), "quantization").message == "weights are not quantized (bfloat16)"
    awq = llm(quant=model_pb2.Quantization(method="awq", bits=4))
    assert outcome(check(awq, VLLM), "quantization") == "PASS"
    gptq_only = worker("workers/vllm-gptq", vllm_caps(quantizations=["gptq"]))
    report = check(awq, gptq_only)
    assert outcome(report, "quantization") == "FAIL"
    assert result(report, "quantization").message == (
        "awq (4-bit) quantized weights are not supported by vllm 0.32.0 on this worker (supported: gptq); "
        "use an unquantized variant or a worker that supports awq"
    )
    # Method names compare regardless of case, `_` or `-`.
    ct = llm(quant=model_pb2.Quantization(method="compressed_tensors", bits=8))
    assert outcome(check(ct, VLLM), "quantization") == "PASS"
    # GGUF quantization is part of the format: one failure (weight_format), not two.
    assert outcome(check(gguf_model(), VLLM), "quantization") == "SKIP"
    assert (
        outcome(check(gguf_model(), worker("workers/llama-cpp", llama_cpp_caps())), "quantization") == "PASS"
    )


def test_context_length_is_capped_with_a_warning() -> None:
    report = check(llm(context=131072), VLLM)
    assert outcome(report, "context_length") == "WARN"
    assert "will be served at 4096 tokens" in result(report, "context_length").message
    assert "model supports 131072 tokens" in result(report, "context_length").message
    fits = check(llm(context=2048), VLLM)
    assert (
        result(fits, "context_length").message
        == "served at the model's full 2048 tokens (the worker allows 4096)"
    )
    no_limit = worker("workers/tf", worker_pb2.WorkerCapabilities(engine="transformers", kinds=[LLM]))
    assert outcome(check(llm(context=131072), no_limit), "context_length") == "PASS"
    unknown = check(llm(context=None), VLLM)
    assert outcome(unknown, "context_length") == "WARN"
    assert "unknown" in result(unknown, "context_length").message
    broken = worker("workers/broken", vllm_caps(max_context_length=0))
    assert outcome(check(llm(), broken), "context_length") == "FAIL"
    trainer = worker("workers/trainer", trainer_caps(), role=TRAINING)
    assert outcome(check(llm(), trainer), "context_length") == "SKIP"


def test_memory_estimate_weights_plus_kv_cache_against_free_memory() -> None:
    # 7.24 B parameters in bfloat16 = 13.5 GiB; KV cache 2 x 32 x 8 x 128 x 4096 x 2 bytes = 512 MiB.
    model = llm(params=7_240_000_000, layers=32, hidden=4096, heads=32, kv_heads=8, context=32768)
    small = worker("workers/small", vllm_caps(), memory=16 * GIB, free=8 * GIB)
    report = check(model, small)
    assert report.estimated_memory_bytes == 7_240_000_000 * 2 + 2 * 32 * 8 * 128 * 4096 * 2
    assert outcome(report, "memory") == "FAIL"
    assert result(report, "memory").message == (
        "model needs ~14.0 GiB (weights 13.5 GiB + KV cache 512 MiB at 4096 tokens); "
        "worker has 8.0 GiB free of 16.0 GiB: unload models from this worker or pick another one"
    )
    assert report.verdict == INCOMPATIBLE


def test_memory_warns_above_ninety_percent_and_fails_beyond_the_device() -> None:
    model = llm()  # ~2.4 GiB with its KV cache at 4096 tokens
    need = check(model, VLLM).estimated_memory_bytes
    tight = worker("workers/tight", vllm_caps(), memory=24 * GIB, free=int(need / 0.95))
    assert outcome(check(model, tight), "memory") == "WARN"
    assert "over 90%" in result(check(model, tight), "memory").message
    roomy = worker("workers/roomy", vllm_caps(), memory=24 * GIB, free=need * 2)
    assert outcome(check(model, roomy), "memory") == "PASS"
    huge = llm(params=70_553_706_496, layers=80, hidden=8192, heads=64, kv_heads=8)
    message = result(check(huge, VLLM), "memory").message
    assert message.startswith("model needs ~132.")
    assert "more than the whole device; use a quantized variant or a larger device" in message


def test_memory_details() -> None:
    # Free memory not reported: compared with the total.
    unknown_free = worker("workers/nofree", vllm_caps(), memory=16 * GIB, free=0)
    assert (
        "worker has 16.0 GiB (free memory not reported)"
        in result(check(llm(), unknown_free), "memory").message
    )
    # An engine spec without a device: memory is skipped but still estimated.
    spec = check(llm(), worker_pb2.EngineSpec(capabilities=vllm_caps()))
    assert outcome(spec, "memory") == "SKIP"
    assert spec.HasField("estimated_memory_bytes")
    # Already loaded: nothing more is needed.
    busy = worker("workers/busy", vllm_caps(), free=1 * GIB, loaded=["models/llama-3-2-1b"])
    assert result(check(llm(), busy), "memory").message == "model is already loaded on this worker"
    # Quantized weights count their bits; a GGUF file counts its size.
    awq = llm(params=8_000_000_000, quant=model_pb2.Quantization(method="awq", bits=4))
    assert "weights 3.7 GiB" in result(check(awq, VLLM), "memory").message
    llama_cpp = worker("workers/llama-cpp", llama_cpp_caps())
    assert (
        "weights 4.6 GiB + KV cache 512 MiB at 4096 tokens"
        in result(check(gguf_model(), llama_cpp), "memory").message
    )
    # Nothing is guessed silently.
    assert (
        "weights 2.3 GiB (dtype unknown, assumed 16-bit)"
        in result(check(llm(dtype=""), VLLM), "memory").message
    )
    # Image pipelines: float16 on a GPU, float32 on a CPU.
    on_gpu = worker("workers/sd-gpu", diffusers_caps(), device_type=worker_pb2.DEVICE_TYPE_CUDA)
    on_cpu = worker("workers/sd-cpu", diffusers_caps(), device_type=worker_pb2.DEVICE_TYPE_CPU)
    assert check(image(), on_gpu).estimated_memory_bytes == 3_470_000_000 * 2
    assert check(image(), on_cpu).estimated_memory_bytes == 3_470_000_000 * 4
    # Unknown size: cannot be estimated, which is said.
    sizeless = llm(params=None)
    assert outcome(check(sizeless, VLLM), "memory") == "WARN"


def test_vllm_counts_the_kv_cache_for_the_whole_served_context() -> None:
    model = llm(context=32768)
    unlimited_vllm = worker("workers/vllm-32k", vllm_caps(max_context_length=65536))
    transformers = worker("workers/tf", worker_pb2.WorkerCapabilities(engine="transformers", kinds=[LLM]))
    assert "KV cache 1.0 GiB at 32768 tokens" in result(check(model, unlimited_vllm), "memory").message
    assert "KV cache 128 MiB at 4096 tokens" in result(check(model, transformers), "memory").message


def test_lora_adapter_needs_lora_support_and_a_rank_within_the_limit() -> None:
    lookup = catalog(llm())
    no_lora = worker("workers/vllm-nolora", vllm_caps(supports_lora=False))
    report = check(adapter(), no_lora, lookup_model=lookup)
    assert outcome(report, "lora") == "FAIL"
    assert "does not apply LoRA adapters" in result(report, "lora").message
    big_rank = check(adapter(rank=64), VLLM, lookup_model=lookup)
    assert result(big_rank, "lora").message == (
        "adapter rank 64 exceeds this worker's max LoRA rank 16; "
        "raise max_lora_rank to 64 or more on the worker, or pick another one"
    )
    assert outcome(check(llm(), VLLM), "lora") == "SKIP"


def test_lora_adapter_base_must_be_in_the_catalog() -> None:
    missing = check(adapter(base="models/llama-3-2-1b"), VLLM, lookup_model=catalog())
    assert outcome(missing, "lora") == "FAIL"
    assert result(missing, "lora").message == (
        "adapter's base model models/llama-3-2-1b is not in the catalog; import it first"
    )
    unresolved = check(adapter(base=""), VLLM, lookup_model=catalog(llm()))
    assert result(unresolved, "lora").message.startswith(
        "adapter's base model is not in the catalog (adapter_config.json names 'meta-llama/Llama-3.2-1B')"
    )
    present = check(
        adapter(),
        worker("workers/vllm-long", vllm_caps(max_context_length=131072)),
        lookup_model=catalog(llm()),
    )
    assert outcome(present, "lora") == "PASS"
    assert result(present, "lora").message == (
        "adapter (rank 8) applies on models/llama-3-2-1b (LlamaForCausalLM), which this worker runs"
    )


def test_lora_adapter_base_must_itself_run_on_the_worker() -> None:
    neo = llm("models/gpt-neo", architecture="GPTNeoForCausalLM", model_type="gpt_neo")
    report = check(
        adapter(base="models/gpt-neo", architecture="GPTNeoForCausalLM"), VLLM, lookup_model=catalog(neo)
    )
    assert outcome(report, "lora") == "FAIL"
    assert result(report, "lora").message.startswith(
        "adapter's base model models/gpt-neo cannot run on this worker: architecture: "
        "architecture GPTNeoForCausalLM is not supported by vllm 0.32.0"
    )
    # A base with a caveat passes the caveat on.
    warned = check(adapter(), VLLM, lookup_model=catalog(llm(context=131072)))
    assert outcome(warned, "lora") == "WARN"
    assert "context_length" in result(warned, "lora").message


def test_lora_adapter_chain_that_loops_fails() -> None:
    looping = adapter(base="models/llama-1b-lora")
    report = check(looping, VLLM, lookup_model=catalog(looping))
    assert outcome(report, "lora") == "FAIL"
    assert "loops" in result(report, "lora").message


def test_lora_adapter_memory_counts_its_base_unless_loaded() -> None:
    lookup = catalog(llm())
    alone = check(llm(), VLLM).estimated_memory_bytes
    with_base = check(adapter(), VLLM, lookup_model=lookup)
    assert with_base.estimated_memory_bytes == alone + 5_636_096 * 4
    assert "+ base models/llama-3-2-1b" in result(with_base, "memory").message
    base_loaded = worker("workers/vllm-loaded", vllm_caps(), loaded=["models/llama-3-2-1b"])
    on_loaded = check(adapter(), base_loaded, lookup_model=lookup)
    assert on_loaded.estimated_memory_bytes == 5_636_096 * 4
    assert "base models/llama-3-2-1b is already loaded" in result(on_loaded, "memory").message


def test_trust_remote_code() -> None:
    custom = llm(remote_code=True)
    report = check(custom, VLLM)
    assert outcome(report, "trust_remote_code") == "FAIL"
    assert "this worker does not allow remote code" in result(report, "trust_remote_code").message
    trusting = worker("workers/trusting", vllm_caps(allows_remote_code=True))
    assert outcome(check(custom, trusting), "trust_remote_code") == "PASS"
    assert outcome(check(llm(), VLLM), "trust_remote_code") == "SKIP"


def test_image_base_model_matches_the_workers_pipelines() -> None:
    sdxl_lora = image(
        "models/pixel-art-xl", checkpoint=model_pb2.CHECKPOINT_TYPE_LORA, params=23_000_000, lora_rank=8
    )
    sd15_only = worker("workers/sd15", diffusers_caps([SD15]))
    report = check(sdxl_lora, sd15_only)
    assert outcome(report, "image_base_model") == "FAIL"
    assert result(report, "image_base_model").message == (
        "an SDXL LoRA needs an SDXL-capable diffusers worker; this worker runs SD 1.5"
    )
    both = worker("workers/sd", diffusers_caps([SD15, SDXL]))
    assert outcome(check(sdxl_lora, both), "image_base_model") == "PASS"
    assert outcome(check(sdxl_lora, both), "lora") == "PASS"
    unknown = image(base=model_pb2.IMAGE_BASE_MODEL_UNSPECIFIED)
    assert outcome(check(unknown, both), "image_base_model") == "WARN"
    assert outcome(check(llm(), both), "image_base_model") == "SKIP"


def test_checkpoint_type_is_a_diffusers_rule() -> None:
    both = worker("workers/sd", diffusers_caps())
    hypernetwork = image(checkpoint=model_pb2.CHECKPOINT_TYPE_HYPERNETWORK, params=100_000)
    assert outcome(check(hypernetwork, both), "checkpoint_type") == "FAIL"
    assert "no loader in diffusers" in result(check(hypernetwork, both), "checkpoint_type").message
    embedding = image(checkpoint=model_pb2.CHECKPOINT_TYPE_EMBEDDING, params=10_000)
    assert "load_textual_inversion" in result(check(embedding, both), "checkpoint_type").message


def test_training_method() -> None:
    trainer = worker("workers/trainer", trainer_caps(), role=TRAINING)
    assert result(check(llm(), trainer), "training_method").message == "can train with: lora, full, dpo"
    report = check(llm(), trainer, training_method="qlora")
    assert outcome(report, "training_method") == "FAIL"
    assert result(report, "training_method").message == (
        "this trainer does not offer qlora training (offers: lora, full, dpo); QLoRA needs a CUDA worker"
    )
    gptq = llm(quant=model_pb2.Quantization(method="gptq", bits=4))
    full_gptq = check(gptq, trainer, training_method="full")
    assert outcome(full_gptq, "training_method") == "FAIL"
    assert "cannot be trained with full" in result(full_gptq, "training_method").message
    lookup = catalog(llm())
    assert result(check(adapter(), trainer, lookup_model=lookup), "training_method").message == (
        "can train with: lora, dpo"
    )
    full_only = worker("workers/full", trainer_caps(["full"]), role=TRAINING)
    assert outcome(check(adapter(), full_only, lookup_model=lookup), "training_method") == "FAIL"
    assert outcome(check(llm(), VLLM), "training_method") == "SKIP"


def test_training_memory_depends_on_the_method() -> None:
    trainer = worker("workers/trainer", trainer_caps(), role=TRAINING, memory=24 * GIB, free=20 * GIB)
    model = llm(params=1_000_000_000, dtype="bfloat16")
    lora = check(model, trainer, training_method="lora")
    assert lora.estimated_memory_bytes == 2_000_000_000
    full = check(model, trainer, training_method="full")
    assert full.estimated_memory_bytes == 16_000_000_000
    assert "AdamW" in result(full, "memory").message
    too_big = check(llm(params=2_000_000_000), trainer, training_method="full")
    assert outcome(too_big, "memory") == "FAIL"


def test_verdicts() -> None:
    long_ok = worker("workers/vllm-long", vllm_caps(max_context_length=131072))
    assert check(llm(), long_ok).verdict == COMPATIBLE
    assert check(llm(), VLLM).verdict == WARNINGS  # context capped at 4096
    assert check(gguf_model(), VLLM).verdict == INCOMPATIBLE


# ---------------------------------------------------------------------------
# FindWorkers ranking


def test_rank_orders_loaded_then_free_memory_then_load_then_name() -> None:
    caps = vllm_caps(max_context_length=131072)
    workers = [
        worker("workers/e-idle-small", caps, free=10 * GIB),
        worker("workers/d-busy-big", caps, free=20 * GIB, running=3, queued=2),
        worker("workers/c-idle-big", caps, free=20 * GIB),
        worker("workers/b-idle-big", caps, free=20 * GIB),
        worker("workers/a-loaded", caps, free=4 * GIB, loaded=["models/llama-3-2-1b"]),
    ]
    matches, rejected = rank(llm(), workers, INFERENCE)
    assert [w.name for w, _ in matches] == [
        "workers/a-loaded",
        "workers/b-idle-big",
        "workers/c-idle-big",
        "workers/d-busy-big",
        "workers/e-idle-small",
    ]
    assert rejected == []
    assert all(r.results[0].rule == "worker_state" for _, r in matches)
    assert all(r.verdict == COMPATIBLE for _, r in matches)


def test_rank_prefers_a_worker_with_the_adapters_base_loaded() -> None:
    caps = vllm_caps(max_context_length=131072)
    workers = [
        worker("workers/a-empty", caps, free=20 * GIB),
        worker("workers/b-base", caps, free=10 * GIB, loaded=["models/llama-3-2-1b"]),
    ]
    matches, _ = rank(adapter(), workers, INFERENCE, catalog(llm()))
    assert [w.name for w, _ in matches] == ["workers/b-base", "workers/a-empty"]


def test_rank_rejects_unhealthy_and_incompatible_workers_with_reasons() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    lapsed = worker("workers/lapsed", vllm_caps(), state=worker_pb2.WORKER_STATE_UNAVAILABLE)
    lapsed.last_heartbeat_time.FromDatetime(now - timedelta(seconds=42))
    draining = worker("workers/draining", vllm_caps(), state=worker_pb2.WORKER_STATE_DRAINING)
    healthy = worker("workers/healthy", vllm_caps())
    healthy.last_heartbeat_time.FromDatetime(now - timedelta(seconds=3))
    image_worker = worker("workers/sd", diffusers_caps())
    trainer = worker("workers/trainer", trainer_caps(), role=TRAINING)

    matches, rejected = rank(llm(), [lapsed, draining, healthy, image_worker, trainer], INFERENCE, now=now)
    assert [w.name for w, _ in matches] == ["workers/healthy"]
    assert result(matches[0][1], "worker_state").message == "worker is healthy (last heartbeat 3 s ago)"
    reasons = {w.name: r for w, r in rejected}
    assert sorted(reasons) == ["workers/draining", "workers/lapsed", "workers/sd", "workers/trainer"]
    assert result(reasons["workers/lapsed"], "worker_state").message == (
        "worker heartbeat lapsed 42 s ago; not routed to"
    )
    assert reasons["workers/lapsed"].verdict == INCOMPATIBLE
    assert failures(reasons["workers/lapsed"]) == ["worker_state"]
    assert "draining" in result(reasons["workers/draining"], "worker_state").message
    assert failures(reasons["workers/sd"]) == ["kind"]
    assert "an inference worker is needed" in result(reasons["workers/trainer"], "role").message


def test_rank_with_no_match_says_why_per_worker() -> None:
    matches, rejected = rank(gguf_model(), [VLLM, worker("workers/sd", diffusers_caps())])
    assert matches == []
    messages = {
        w.name: [r.message for r in rep.results if r.outcome == worker_pb2.RULE_OUTCOME_FAIL]
        for w, rep in rejected
    }
    assert any("need a llama-cpp worker" in m for m in messages["workers/vllm"])
    assert any("use a llama-cpp, transformers or vllm worker" in m for m in messages["workers/sd"])


def test_rank_for_embeddings_judges_each_worker_by_its_embedding_engines() -> None:
    transformers = capabilities.transformers_capabilities()
    assert transformers.supports_embeddings and not vllm_caps().supports_embeddings
    vllm_only = worker("workers/a-vllm", vllm_caps(), free=22 * GIB, loaded=["models/llama-3-2-1b"])
    auto = worker("workers/b-auto", vllm_caps(), free=10 * GIB)
    auto.engines.extend([vllm_caps(), transformers])

    matches, _ = rank(llm(), [vllm_only, auto], INFERENCE)
    assert [w.name for w, _ in matches] == ["workers/a-vllm", "workers/b-auto"]
    assert matches[1][1].engine == "vllm"

    matches, rejected = rank(llm(), [vllm_only, auto], INFERENCE, embeddings=True)
    assert [w.name for w, _ in matches] == ["workers/b-auto"]
    assert matches[0][0] == auto  # the registered worker, not the view the rules saw
    assert matches[0][1].engine == "transformers" and matches[0][1].verdict != INCOMPATIBLE
    assert [w.name for w, _ in rejected] == ["workers/a-vllm"]
    assert failures(rejected[0][1]) == ["embeddings"]  # vLLM itself could run it
    assert result(rejected[0][1], "embeddings").message == (
        "no engine of this worker (vllm) computes embeddings; "
        "Embed needs a worker with the transformers engine"
    )


# ---------------------------------------------------------------------------
# Acceptance: a fleet described by its real capabilities


@pytest.fixture(scope="module")
def fleet() -> dict[str, worker_pb2.Worker]:
    """vLLM on a CPU, transformers, llama.cpp, diffusers on a GPU and a peft trainer."""
    # Every worker has 24 GiB; the CPU ones run on the CPU (the `worker()` defaults).
    return {
        "vllm": worker(
            "workers/vllm-cpu",
            capabilities.vllm_capabilities(
                max_context_length=4096,
                max_lora_rank=16,
                device=worker_pb2.Device(type=worker_pb2.DEVICE_TYPE_CPU),
            ),
            free=20 * GIB,
        ),
        "transformers": worker(
            "workers/transformers", capabilities.transformers_capabilities(), free=18 * GIB
        ),
        "llama-cpp": worker("workers/llama-cpp", llama_cpp_caps(), free=16 * GIB),
        "diffusers": worker(
            "workers/diffusers",
            capabilities.diffusers_capabilities(),
            memory=24 * GIB,
            free=22 * GIB,
            device_type=worker_pb2.DEVICE_TYPE_CUDA,
        ),
        "trainer": worker(
            "workers/trainer", capabilities.peft_trainer_capabilities(), role=TRAINING, free=20 * GIB
        ),
    }


LLAMA_1B = llm()
NEO = llm(
    "models/gpt-neo-125m",
    architecture="GPTNeoForCausalLM",
    model_type="gpt_neo",
    params=125_198_592,
    dtype="float32",
    context=2048,
    layers=12,
    hidden=768,
    heads=12,
    kv_heads=12,
)
FOO = llm("models/foo", architecture="FooForCausalLM", model_type="foo")
LLAMA_70B = llm("models/llama-3-1-70b", params=70_553_706_496, layers=80, hidden=8192, heads=64, kv_heads=8)
SDXL_BASE = image()
SDXL_LORA = image(
    "models/pixel-art-xl", checkpoint=model_pb2.CHECKPOINT_TYPE_LORA, params=23_000_000, lora_rank=8
)
CATALOG = catalog(LLAMA_1B, NEO)

V, W, X = "COMPATIBLE", "COMPATIBLE_WITH_WARNINGS", "INCOMPATIBLE"
#: model -> expected verdict per worker (vllm, transformers, llama-cpp, diffusers, trainer)
MATRIX: dict[str, tuple[model_pb2.Model, tuple[str, str, str, str, str]]] = {
    "safetensors llama (context capped by vllm)": (LLAMA_1B, (W, V, X, X, V)),
    "gguf": (gguf_model(), (X, X, V, X, X)),
    "lora with its base": (adapter(), (W, V, X, X, V)),
    "lora without its base": (adapter("models/orphan-lora", base="models/gone"), (X, X, X, X, X)),
    "architecture vllm lacks": (NEO, (X, V, X, X, V)),
    "made-up architecture": (FOO, (X, X, X, X, X)),
    "sdxl checkpoint": (SDXL_BASE, (X, X, X, V, X)),
    "sdxl lora": (SDXL_LORA, (X, X, X, V, X)),
    "too large": (LLAMA_70B, (X, X, X, X, X)),
}


@pytest.mark.parametrize("case", list(MATRIX))
def test_acceptance_matrix(case: str, fleet: dict[str, worker_pb2.Worker]) -> None:
    model, expected = MATRIX[case]
    got = tuple(
        worker_pb2.Verdict.Name(check(model, fleet[w], lookup_model=CATALOG).verdict).removeprefix("VERDICT_")
        for w in ("vllm", "transformers", "llama-cpp", "diffusers", "trainer")
    )
    assert got == expected


def test_acceptance_messages(fleet: dict[str, worker_pb2.Worker]) -> None:
    vllm, transformers, llama_cpp, diffusers = (
        fleet["vllm"],
        fleet["transformers"],
        fleet["llama-cpp"],
        fleet["diffusers"],
    )
    version = vllm.capabilities.engine_version

    capped = check(LLAMA_1B, vllm, lookup_model=CATALOG)
    assert "will be served at 4096 tokens" in result(capped, "context_length").message

    gguf = check(gguf_model(), vllm, lookup_model=CATALOG)
    assert failures(gguf) == ["weight_format"]
    assert result(gguf, "weight_format").message.startswith(
        f"GGUF weights need a llama-cpp worker; this worker runs vllm {version}"
    )
    assert check(gguf_model(), llama_cpp).verdict == COMPATIBLE

    neo = check(NEO, vllm, lookup_model=CATALOG)
    assert failures(neo) == ["architecture"]
    assert re.match(
        rf"architecture GPTNeoForCausalLM is not supported by vllm {re.escape(version)} "
        r"\(supported: \d{3} architectures, e\.g\. LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM\)",
        result(neo, "architecture").message,
    )
    assert result(check(NEO, transformers), "architecture").message.startswith("transformers ")

    orphan = check(adapter("models/orphan-lora", base="models/gone"), vllm, lookup_model=CATALOG)
    assert failures(orphan) == ["lora"]
    assert (
        result(orphan, "lora").message
        == "adapter's base model models/gone is not in the catalog; import it first"
    )

    sdxl_on_vllm = check(SDXL_BASE, vllm)
    assert "kind" in failures(sdxl_on_vllm)
    assert result(sdxl_on_vllm, "kind").message.endswith("use a diffusers worker")
    sdxl = check(SDXL_BASE, diffusers)
    assert result(sdxl, "image_base_model").message.startswith(
        "SDXL checkpoint; this worker runs SD 1.5, SD 2.1, SDXL"
    )

    too_large = check(LLAMA_70B, transformers)
    assert failures(too_large) == ["memory"]
    assert result(too_large, "memory").message.startswith(
        "model needs ~132.7 GiB (weights 131.4 GiB + KV cache 1.2 GiB at 4096 tokens)"
    )
    assert "worker has 18.0 GiB free of 24.0 GiB" in result(too_large, "memory").message


def test_acceptance_find_workers(fleet: dict[str, worker_pb2.Worker]) -> None:
    workers = list(fleet.values())
    matches, rejected = rank(LLAMA_1B, workers, INFERENCE, CATALOG)
    assert [w.name for w, _ in matches] == [
        "workers/vllm-cpu",
        "workers/transformers",
    ]  # 20 GiB free, then 18
    assert sorted(w.name for w, _ in rejected) == [
        "workers/diffusers",
        "workers/llama-cpp",
        "workers/trainer",
    ]

    matches, _ = rank(gguf_model(), workers, INFERENCE, CATALOG)
    assert [w.name for w, _ in matches] == ["workers/llama-cpp"]

    matches, _ = rank(NEO, workers, TRAINING, CATALOG)
    assert [w.name for w, _ in matches] == ["workers/trainer"]
    assert (
        result(matches[0][1], "training_method").message
        == "can train with: lora, full, dpo, orpo, kto, reward, grpo"
    )

    matches, rejected = rank(FOO, workers, None, CATALOG)
    assert matches == []
    assert len(rejected) == len(workers)
    assert all(failures(report) for _, report in rejected)


# ---------------------------------------------------------------------------
# Real tiny models, detected from their files


@pytest.fixture(scope="module")
def detected(tmp_path_factory: pytest.TempPathFactory) -> dict[str, model_pb2.Model]:
    """Tiny Llama, its LoRA adapter, a GGUF file and an SDXL pipeline, detected like the catalog does."""
    detection = pytest.importorskip("catalog_service.detection")
    tiny_llm = pytest.importorskip("tinymodels.llm")
    tiny_gguf = pytest.importorskip("tinymodels.gguf_file")
    tiny_diffusion = pytest.importorskip("tinymodels.diffusion")
    root = tmp_path_factory.mktemp("compat-models")
    paths = {
        "tiny-llama": tiny_llm.build_llm(root / "llama", "llama"),
        "tiny-gguf": tiny_gguf.build_gguf(root / "tiny.gguf", tensor_type="q8_0"),
        "tiny-sdxl": tiny_diffusion.build_sdxl_pipeline(root / "sdxl"),
    }
    paths["tiny-lora"] = tiny_llm.build_lora_adapter(paths["tiny-llama"], root / "lora")
    models = {}
    for model_id, path in paths.items():
        found = detection.detect(Path(path))
        model = model_pb2.Model(name=f"models/{model_id}", state=model_pb2.MODEL_STATE_READY)
        found.apply_to(model)
        model.size_bytes = (
            sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
            if Path(path).is_dir()
            else Path(path).stat().st_size
        )
        models[model_id] = model
    # What the catalog does on import when the adapter's base is in the catalog.
    models["tiny-lora"].llm.adapter.base_model = "models/tiny-llama"
    models["tiny-lora"].parent = "models/tiny-llama"
    return models


def test_detected_models_route_to_the_right_workers(
    detected: dict[str, model_pb2.Model], fleet: dict[str, worker_pb2.Worker]
) -> None:
    workers = list(fleet.values())
    lookup = catalog(*detected.values())

    def routed(model_id: str) -> list[str]:
        matches, _ = rank(detected[model_id], workers, INFERENCE, lookup)
        return sorted(w.name for w, _ in matches)

    assert routed("tiny-llama") == ["workers/transformers", "workers/vllm-cpu"]
    assert routed("tiny-lora") == ["workers/transformers", "workers/vllm-cpu"]
    assert routed("tiny-gguf") == ["workers/llama-cpp"]
    assert routed("tiny-sdxl") == ["workers/diffusers"]

    orphan = model_pb2.Model()
    orphan.CopyFrom(detected["tiny-lora"])
    orphan.llm.adapter.base_model, orphan.parent = "", ""
    report = check(orphan, fleet["vllm"], lookup_model=lookup)
    assert failures(report) == ["lora"]
    assert "adapter's base model is not in the catalog" in result(report, "lora").message
