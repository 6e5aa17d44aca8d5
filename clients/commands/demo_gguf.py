"""`modelyard demo --gguf`: the last step, taking the fine-tune to llama.cpp.

Merges the demo's adapter into its base, exports the merged model to GGUF with llama.cpp's
converter and quantizer (on the trainer), and chats with the GGUF file on the inference
worker the catalog routes it to (its llama.cpp engine), next to the adapter's answer.
"""

from __future__ import annotations

import time
from typing import Any

from clients.catalog import CatalogClient
from clients.commands.common import client_kwargs
from clients.inference import InferenceClient
from clients.trainer import TrainerClient

DEFAULT_TYPE = "q8_0"
"""GGUF file type of `--gguf` without a value."""


def gguf_step(demo: Any, catalog: CatalogClient, trainer: TrainerClient, adapter: str) -> None:
    """Merge, export, route and chat; records `gguf_model` on the demo's outcome."""
    narrator = demo.narrator
    file_type = demo.args.gguf
    adapter_id = adapter.removeprefix("models/")
    merged_id = f"{adapter_id}-merged"
    started = time.monotonic()
    prompt = demo.prompts[0]
    with narrator.step(
        "Take the fine-tune to llama.cpp",
        "The trainer merges the adapter into its base (peft merge_and_unload) and exports the "
        f"merged model to GGUF {file_type} with llama.cpp's own converter and quantizer; both are "
        "registered in the catalog (lineage: base -> adapter -> merged -> GGUF). The catalog routes "
        "the GGUF file to a worker's llama.cpp engine, as Ollama or llama-server would run it.",
        [
            f"modelyard models merge {adapter_id}{demo._flags('trainer')}",
            f"modelyard models export {merged_id} --format gguf --quantization {file_type}"
            f"{demo._flags('trainer')}",
            f"modelyard generate {merged_id}-{file_type.replace('_', '-')} "
            f"'{prompt}' --temperature 0{demo._flags('catalog')}",
        ],
    ):
        merged = trainer.merge_adapter(adapter)
        narrator.say(f"merged {adapter} into its base: {merged}")
        exported = trainer.export_model(merged, quantization=file_type)
        entry = catalog.get_model(exported)
        size = sum(f.size_bytes for f in entry.files)
        narrator.say(f"exported {exported} ({entry.llm.dtype}, {size / 1e6:.1f} MB): {entry.local_path}")
        demo.outcome.gguf_model = exported
        with InferenceClient.for_model(exported, catalog=catalog, **client_kwargs(demo.args)) as llm:
            assert llm.worker is not None
            narrator.say(f"{exported} -> {llm.worker.name} ({llm.worker.capabilities.engine} engine)")
            messages = [{"role": "user", "content": prompt}]
            answer = llm.chat(
                exported, messages, max_tokens=demo.recipe.max_tokens, temperature=0.0, timeout=300.0
            )
        text = answer.choices[0].message.content
        narrator.print()
        narrator.print(f"{narrator.INDENT}user: {prompt}")
        narrator.print(f"{narrator.INDENT}[{exported}] {text}")
        if demo.outcome.comparisons:
            narrator.print(f"{narrator.INDENT}[{adapter}] {demo.outcome.comparisons[0].adapter}")
        narrator.print()
    demo._timed("gguf", started)
