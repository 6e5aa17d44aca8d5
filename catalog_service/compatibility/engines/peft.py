"""peft trainer: fine-tunes LLMs (LoRA, QLoRA on CUDA, full, DPO, ORPO, KTO, reward, GRPO) with TRL.

Memory is estimated per training method — the requested one, else the
lightest the worker offers that applies to the model:

* lora / dpo (LoRA, the reference is the base with the adapter off): the
  frozen weights in their dtype;
* qlora: the weights at 4 bits;
* full (AdamW): ~16 bytes per parameter (float32 weights, gradients and two
  optimizer states).

Activations depend on the batch and sequence length and are not counted, so
the estimate is a floor.
"""

from __future__ import annotations

from catalog_service.compatibility.context import (
    TRAINING,
    Context,
    EngineTable,
    MemoryEstimate,
    adapter_estimate,
    bytes_per_parameter,
    estimate_inference_memory,
    gib,
    weights_bytes,
)
from catalog_service.compatibility.engines import register
from catalog_service.compatibility.engines.transformers import causal_lm_architectures
from modelyard.catalog.v1 import model_pb2


def _method(ctx: Context) -> str:
    """The requested method, else the first of lora, dpo, qlora, full offered and applicable."""
    if ctx.training_method:
        return ctx.training_method.lower()
    offered = ctx.training_methods
    quantized = ctx.llm is not None and ctx.llm.HasField("quantization") and bool(ctx.llm.quantization.method)
    for method in ("lora", "dpo", "qlora", "full"):
        if method in offered and not (method == "full" and (quantized or ctx.is_adapter)):
            return method
    return offered[0] if offered else "lora"


def estimate_training_memory(ctx: Context) -> MemoryEstimate | None:
    """Memory to train the model with the chosen method (activations not counted)."""
    llm = ctx.llm
    if llm is None:
        return estimate_inference_memory(ctx)
    weights = weights_bytes(ctx.model)
    if ctx.is_adapter:
        return adapter_estimate(ctx, weights[0] if weights else None, weights[1] if weights else "")
    method = _method(ctx)
    params: int | None = llm.parameter_count if llm.HasField("parameter_count") else None
    if params is None and weights is not None:
        params = int(weights[0] / bytes_per_parameter(llm)[0])
    if params is None or weights is None:
        return None
    if method == "full":
        total = params * 16
        return MemoryEstimate(
            total,
            f"full fine-tuning: {gib(total)} for float32 weights, gradients and AdamW states; "
            "activations extra",
        )
    if method == "qlora":
        total = params // 2
        return MemoryEstimate(total, f"QLoRA: 4-bit weights {gib(total)}; activations extra")
    return MemoryEstimate(weights[0], f"{method}: frozen weights {gib(weights[0])}; activations extra")


TABLE = register(
    EngineTable(
        name="peft",
        roles=frozenset({TRAINING}),
        kinds=frozenset({model_pb2.MODEL_KIND_LLM}),
        weight_formats=frozenset({model_pb2.WEIGHT_FORMAT_SAFETENSORS}),
        quantizations=frozenset({"bitsandbytes", "gptq", "awq"}),
        default_architectures=causal_lm_architectures,
        default_architectures_complete=True,
        training_methods=frozenset({"lora", "full", "dpo", "orpo", "kto", "reward", "grpo"}),
        kv_cache_tokens=0,
        estimate_memory=estimate_training_memory,
    )
)
