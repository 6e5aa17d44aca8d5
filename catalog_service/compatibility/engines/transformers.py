"""transformers: inference of LLMs for CPU-only deployments and architectures vLLM lacks.

Architectures default to transformers' own causal-LM auto mapping
(`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), which is the whole list for the
installed version, so a miss FAILs. GGUF is not listed: transformers
dequantizes a GGUF file to full precision on load (a 4 GiB Q4 file becomes
~30 GiB of float32), which is a conversion path, not a way to serve it.
"""

from __future__ import annotations

import functools

from catalog_service.compatibility.context import INFERENCE, EngineTable
from catalog_service.compatibility.engines import register
from modelyard.catalog.v1 import model_pb2


@functools.cache
def causal_lm_architectures() -> frozenset[str]:
    """Architecture classes transformers' AutoModelForCausalLM knows (imported once, ~3 s)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return frozenset(names)


TABLE = register(
    EngineTable(
        name="transformers",
        roles=frozenset({INFERENCE}),
        preference=20,
        kinds=frozenset({model_pb2.MODEL_KIND_LLM}),
        weight_formats=frozenset({model_pb2.WEIGHT_FORMAT_SAFETENSORS}),
        quantizations=frozenset({"bitsandbytes", "gptq", "awq", "compressed-tensors"}),
        default_architectures=causal_lm_architectures,
        default_architectures_complete=True,
        kv_cache_tokens=4096,
    )
)
