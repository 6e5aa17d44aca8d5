"""Warm the import flow up at start-up, off the request path.

Detection and validation import transformers (and with it torch), gguf and
transformers' auto mappings lazily, the first time they need them: ~3-4 s of
imports on a 2-core machine, which used to land on the first `ImportModel` after a
catalog started, whatever the model's size. `warm_up()` runs the same detection and
validation once on a tiny model written to a temporary folder (a Llama config, a
tokenizer config with a chat template, a one-tensor safetensors file), so every lazy
import and first-use cache is paid before a user imports anything. The catalog app
runs it in a thread once it serves (`CatalogApp.on_serving`); an import that arrives
meanwhile waits on Python's import lock for the modules still loading, never loads
them twice.
"""

from __future__ import annotations

import json
import logging
import struct
import tempfile
import time
from pathlib import Path

log = logging.getLogger("modelyard.catalog")

_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "num_hidden_layers": 1,
    "vocab_size": 4,
    "max_position_embeddings": 64,
    "torch_dtype": "float32",
}
_TOKENIZER_CONFIG = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
}


def _write_tiny_model(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps(_CONFIG))
    (folder / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG))
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.7}))
    header = json.dumps(
        {"model.embed_tokens.weight": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]}}
    ).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(128))


def warm_up() -> float:
    """Detect and validate a tiny model once (loads what imports load lazily); the seconds taken.

    Never raises: a failure is logged and the first real import pays what is left.
    """
    from catalog_service import detection, validation
    from catalog_service.detection import llm

    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="modelyard-warmup-") as tmp:
            folder = Path(tmp)
            _write_tiny_model(folder)
            found = detection.detect(folder, allowed_roots=[folder])
            validation.validate(folder, found, deep=False, allowed_roots=[folder])
        llm._audio_tasks()  # transformers' auto model mappings (audio detection)
        import gguf  # noqa: F401  (GGUF detection)
    except Exception as exc:
        log.warning("warming the import flow up failed (the first import will be slower): %s", exc)
    return time.perf_counter() - started


__all__ = ["warm_up"]
