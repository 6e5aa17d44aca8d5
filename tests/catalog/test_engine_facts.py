"""Rules that read what the engines report about themselves, and workers with several engines.

- `attention`: the model's head size against the head sizes the engine's attention backend
  accepts on the worker's device (reported by the worker, read from vLLM at start-up);
- a worker with vLLM and transformers is matched on the first engine that runs the model,
  says so in its `engine` rule, lists the other engine with its reason, and ranks after a
  worker whose vLLM runs the model;
- the installed vLLM really reports those facts (head sizes, dtypes) on this machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from catalog_service.compatibility import check
from catalog_service.detection import detect
from catalog_service.ranking import rank
from modelyard.catalog.v1 import model_pb2, worker_pb2
from server_kit import capabilities
from tests.catalog.test_compatibility import GIB, llm, vllm_caps, worker

FAIL = worker_pb2.RULE_OUTCOME_FAIL
PASS = worker_pb2.RULE_OUTCOME_PASS
WARN = worker_pb2.RULE_OUTCOME_WARN
SKIP = worker_pb2.RULE_OUTCOME_SKIP
CPU_HEAD_SIZES = [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]


def tiny(name: str, *, hidden: int = 64, heads: int = 2, head_dim: int | None = None) -> model_pb2.Model:
    """A tiny Qwen2-style model as detection describes it (float32, context 256)."""
    model = llm(
        name,
        architecture="Qwen2ForCausalLM",
        model_type="qwen2",
        params=140_000,
        dtype="float32",
        context=256,
        layers=2,
        hidden=hidden,
        heads=heads,
        kv_heads=1,
    )
    model.llm.head_dim = head_dim if head_dim is not None else hidden // heads
    return model


def cpu_vllm() -> worker_pb2.WorkerCapabilities:
    return vllm_caps(attention_head_sizes=CPU_HEAD_SIZES, dtypes=["bfloat16", "float16", "float32"])


def transformers_caps() -> worker_pb2.WorkerCapabilities:
    return worker_pb2.WorkerCapabilities(
        engine="transformers",
        engine_version="5.19.0",
        kinds=[model_pb2.MODEL_KIND_LLM],
        architectures=["Qwen2ForCausalLM", "LlamaForCausalLM"],
        weight_formats=[model_pb2.WEIGHT_FORMAT_SAFETENSORS],
        supports_lora=True,
    )


def result(report: worker_pb2.CompatibilityReport, rule: str) -> worker_pb2.RuleResult:
    return next(r for r in report.results if r.rule == rule)


def both_engines(name: str, *, free: int = 20 * GIB) -> worker_pb2.Worker:
    """The default `--engine auto` worker: vLLM first, transformers second."""
    w = worker(name, cpu_vllm(), free=free)
    w.engines.extend([cpu_vllm(), transformers_caps()])
    return w


def test_a_head_size_the_engine_does_not_list_fails_with_the_sizes_it_accepts() -> None:
    report = check(tiny("models/q16", heads=4), worker("workers/v", cpu_vllm()))
    attention = result(report, "attention")
    assert attention.outcome == FAIL
    assert "head size 16 is not supported by vllm 0.32.0" in attention.message
    assert "32, 64, 80" in attention.message and "transformers" in attention.message
    assert report.verdict == worker_pb2.VERDICT_INCOMPATIBLE


def test_a_listed_head_size_passes_and_an_engine_that_lists_none_skips() -> None:
    assert result(check(tiny("models/q32"), worker("workers/v", cpu_vllm())), "attention").outcome == PASS
    report = check(tiny("models/q16", heads=4), worker("workers/t", transformers_caps()))
    assert result(report, "attention").outcome == SKIP
    assert report.verdict == worker_pb2.VERDICT_COMPATIBLE


def test_an_explicit_head_dim_is_what_counts() -> None:
    """Gemma-style configs state a head_dim unrelated to hidden / heads."""
    model = tiny("models/gemma-like", hidden=64, heads=4, head_dim=32)
    assert result(check(model, worker("workers/v", cpu_vllm())), "attention").outcome == PASS


def test_an_unknown_head_size_warns_on_an_engine_with_limits() -> None:
    model = tiny("models/q")
    model.llm.ClearField("head_dim")
    assert result(check(model, worker("workers/v", cpu_vllm())), "attention").outcome == WARN


def test_a_state_space_model_has_no_head_size_for_an_attention_kernel(tmp_path: Path) -> None:
    """Mamba-2's `num_heads`/`head_dim` (16 here) are state-space heads: detection does not
    report them as attention heads, and vLLM's head-size limit does not refuse the model (the
    conformance matrix found vLLM runs it)."""
    from tinymodels.zoo import build_zoo_model, by_key

    detected = detect(build_zoo_model(by_key("mamba2"), tmp_path / "mamba2")).config
    assert isinstance(detected, model_pb2.LlmConfig)
    assert not detected.HasField("head_dim") and not detected.HasField("num_attention_heads")
    model = tiny("models/mamba2")
    model.llm.CopyFrom(detected)
    assert result(check(model, worker("workers/v", cpu_vllm())), "attention").outcome == SKIP


def test_a_worker_with_two_engines_serves_what_vllm_refuses_on_transformers() -> None:
    report = check(tiny("models/q16", heads=4), both_engines("workers/auto"))
    assert report.engine == "transformers"
    assert report.verdict == worker_pb2.VERDICT_COMPATIBLE_WITH_WARNINGS
    engine = result(report, "engine")
    assert engine.outcome == WARN
    assert "fallback engine: vllm cannot run it (attention: attention head size 16" in engine.message
    assert [(o.engine, o.verdict) for o in report.other_engines] == [
        ("vllm", worker_pb2.VERDICT_INCOMPATIBLE)
    ]


def test_a_worker_with_two_engines_serves_what_vllm_runs_on_vllm() -> None:
    report = check(tiny("models/q32"), both_engines("workers/auto"))
    assert report.engine == "vllm"
    assert report.verdict == worker_pb2.VERDICT_COMPATIBLE
    assert "preferred engine" in result(report, "engine").message
    assert [o.engine for o in report.other_engines] == ["transformers"]


def test_find_workers_ranks_the_vllm_path_before_a_fallback_with_more_memory() -> None:
    workers = [
        worker("workers/transformers-only", transformers_caps(), free=23 * GIB),
        both_engines("workers/auto", free=2 * GIB),
    ]
    matches, rejected = rank(tiny("models/q32"), workers)
    assert [(w.name, r.engine) for w, r in matches] == [
        ("workers/auto", "vllm"),
        ("workers/transformers-only", "transformers"),
    ]
    # For a model vLLM refuses both run it on transformers: free memory decides.
    matches, _ = rank(tiny("models/q16", heads=4), workers)
    assert [(w.name, r.engine) for w, r in matches] == [
        ("workers/transformers-only", "transformers"),
        ("workers/auto", "transformers"),
    ]
    assert rejected == []


def test_the_installed_vllm_reports_its_attention_head_sizes_and_dtypes_here() -> None:
    caps = capabilities.vllm_capabilities()
    assert 16 not in caps.attention_head_sizes  # the head size that kills its CPU attention
    assert {32, 64, 128} <= set(caps.attention_head_sizes)
    assert {"float32", "bfloat16"} <= set(caps.dtypes)


def test_detection_reads_the_head_size_and_sliding_window(tmp_path: Path) -> None:
    from tinymodels.llm import build_llm

    detected = detect(build_llm(tmp_path / "q16", "qwen2", num_heads=4, num_kv_heads=2)).config
    assert isinstance(detected, model_pb2.LlmConfig)
    assert detected.head_dim == 16
    config = json.loads((tmp_path / "q16" / "config.json").read_text())
    config.update(head_dim=32, sliding_window=128)  # stated explicitly, as Gemma and Mistral do
    (tmp_path / "q16" / "config.json").write_text(json.dumps(config))
    detected = detect(tmp_path / "q16").config
    assert isinstance(detected, model_pb2.LlmConfig)
    assert (detected.head_dim, detected.sliding_window) == (32, 128)


def test_detection_survives_per_layer_config_attributes(tmp_path: Path) -> None:
    """transformers 5 raises when a per-layer attribute (Gemma 4's head_dim) is read globally;
    detection falls back to what config.json states instead of failing the import."""
    from tinymodels.zoo import build_zoo_model, by_key

    detected = detect(build_zoo_model(by_key("gemma4_text"), tmp_path / "gemma4")).config
    assert isinstance(detected, model_pb2.LlmConfig)
    assert detected.model_type == "gemma4_text" and detected.num_layers == 2
