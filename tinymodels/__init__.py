"""Tiny real models, built on the spot for tests and demos (no downloads).

* :func:`build_tokenizer` -- byte-level BPE tokenizer with a ChatML chat template.
* :func:`build_llm` -- tiny Llama / Qwen2 / GPT-2 / Mistral causal LM (safetensors).
* :func:`build_lora_adapter` -- a peft LoRA adapter for such a model.
* :func:`build_zoo_model` -- one of :data:`tinymodels.zoo.ZOO`, tiny causal LMs of about 100
  transformers model types (plus variants: head sizes, dtypes, tied, sliding window).
* :func:`build_gguf` -- a llama GGUF file (loads in transformers with ``gguf_file=``).
* :func:`build_hf_cache` -- a Hugging Face hub cache entry made from a local folder.
* :mod:`tinymodels.diffusion` -- tiny SD1.5 / SDXL pipelines, single-file checkpoints,
  kohya LoRAs, textual inversions, VAE-only files.

Heavy libraries (torch, transformers, diffusers, peft, gguf) are imported lazily, inside the
functions, so importing this package is cheap.  Run ``python -m tinymodels --help`` for a CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "build_gguf",
    "build_hf_cache",
    "build_kohya_lora",
    "build_llm",
    "build_lora_adapter",
    "build_sd15_pipeline",
    "build_sd_single_file",
    "build_sdxl_pipeline",
    "build_textual_inversion",
    "build_tokenizer",
    "build_vae_only",
    "build_zoo_model",
]

_LOCATIONS = {
    "build_tokenizer": "tinymodels.tokenizer",
    "build_llm": "tinymodels.llm",
    "build_lora_adapter": "tinymodels.llm",
    "build_gguf": "tinymodels.gguf_file",
    "build_hf_cache": "tinymodels.hf_cache",
    "build_sd15_pipeline": "tinymodels.diffusion",
    "build_sdxl_pipeline": "tinymodels.diffusion",
    "build_sd_single_file": "tinymodels.diffusion",
    "build_kohya_lora": "tinymodels.diffusion",
    "build_textual_inversion": "tinymodels.diffusion",
    "build_vae_only": "tinymodels.diffusion",
    "build_zoo_model": "tinymodels.zoo",
}

if TYPE_CHECKING:
    from tinymodels.diffusion import (
        build_kohya_lora,
        build_sd15_pipeline,
        build_sd_single_file,
        build_sdxl_pipeline,
        build_textual_inversion,
        build_vae_only,
    )
    from tinymodels.gguf_file import build_gguf
    from tinymodels.hf_cache import build_hf_cache
    from tinymodels.llm import build_llm, build_lora_adapter
    from tinymodels.tokenizer import build_tokenizer
    from tinymodels.zoo import build_zoo_model


def __getattr__(name: str) -> Any:
    """Import builders lazily (``tinymodels.diffusion`` imports torch at module level)."""
    if name in _LOCATIONS:
        import importlib

        return getattr(importlib.import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module 'tinymodels' has no attribute {name!r}")
