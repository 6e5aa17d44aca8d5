"""llama.cpp: inference of GGUF files.

A GGUF file names its architecture in `general.architecture` (`llama`,
`qwen2`, ...), which detection turns into the transformers `model_type`
(`qwen2_moe` for `qwen2moe`); the architecture rule matches that, ignoring
case, `_` and `-`, and through `MODEL_TYPE_TO_GGUF` for the few names that
differ more, against the worker's list, by default every architecture the
installed `gguf` package knows. The KV cache is counted for
at most 4096 tokens (llama-server's default `--ctx-size`).
"""

from __future__ import annotations

import functools

from catalog_service.compatibility.context import INFERENCE, EngineTable
from catalog_service.compatibility.engines import register
from modelyard.catalog.v1 import model_pb2

#: transformers `model_type`s whose GGUF architecture name differs beyond `_`/`-` and case.
MODEL_TYPE_TO_GGUF = {
    "phi": "phi2",
    "gpt_bigcode": "starcoder",
    "cohere": "command-r",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
}


@functools.cache
def gguf_architectures() -> frozenset[str]:
    """Architecture names of the `gguf` package (llama.cpp's list)."""
    import gguf

    return frozenset(gguf.MODEL_ARCH_NAMES.values())


TABLE = register(
    EngineTable(
        name="llama-cpp",
        roles=frozenset({INFERENCE}),
        preference=10,
        kinds=frozenset({model_pb2.MODEL_KIND_LLM}),
        weight_formats=frozenset({model_pb2.WEIGHT_FORMAT_GGUF}),
        quantizations=frozenset({"gguf"}),
        default_architectures=gguf_architectures,
        default_architectures_complete=True,
        architecture_aliases=MODEL_TYPE_TO_GGUF,
        kv_cache_tokens=4096,
    )
)
