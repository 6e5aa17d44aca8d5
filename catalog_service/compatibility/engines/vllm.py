"""vLLM: inference of LLMs from safetensors weights, with LoRA adapters.

Workers discover their real list of architectures from vLLM's own model
registry (`server_kit.capabilities.vllm_capabilities`); the defaults here are
only used for a worker or engine spec that lists none, so a miss in them WARNs
rather than FAILs. vLLM's Transformers fallback (`model_impl="transformers"`)
is not assumed: an architecture missing from the worker's list FAILs and the
message points to a transformers worker.

GGUF: vLLM 0.32 has no GGUF loader any more (`gguf` is not among its
quantization methods), so GGUF files go to llama-cpp workers. vLLM must hold
one full-length sequence in its KV cache at start-up (it refuses to start
otherwise), so the memory estimate counts the KV cache for the whole served
context (`kv_cache_tokens=None`).
"""

from __future__ import annotations

from catalog_service.compatibility.context import INFERENCE, EngineTable
from catalog_service.compatibility.engines import register
from modelyard.catalog.v1 import model_pb2

#: Common text-generation architectures of vLLM, for workers that list none.
COMMON_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "MixtralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Phi3ForCausalLM",
        "PhiForCausalLM",
        "GPT2LMHeadModel",
        "GPTNeoXForCausalLM",
        "GPTJForCausalLM",
        "FalconForCausalLM",
        "OPTForCausalLM",
        "BloomForCausalLM",
        "StableLmForCausalLM",
        "Starcoder2ForCausalLM",
        "DeepseekV2ForCausalLM",
        "DeepseekV3ForCausalLM",
        "OlmoForCausalLM",
        "Olmo2ForCausalLM",
        "GraniteForCausalLM",
        "InternLM2ForCausalLM",
        "CohereForCausalLM",
        "ExaoneForCausalLM",
    }
)

TABLE = register(
    EngineTable(
        name="vllm",
        roles=frozenset({INFERENCE}),
        preference=0,
        kinds=frozenset({model_pb2.MODEL_KIND_LLM}),
        weight_formats=frozenset({model_pb2.WEIGHT_FORMAT_SAFETENSORS}),
        quantizations=frozenset({"awq", "gptq", "compressed-tensors", "fp8"}),
        default_architectures=lambda: COMMON_ARCHITECTURES,
        default_architectures_complete=False,
        kv_cache_tokens=None,
        architecture_hint="a transformers worker can run architectures vLLM lacks",
    )
)
