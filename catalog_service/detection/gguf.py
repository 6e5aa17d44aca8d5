"""Detection of llama.cpp GGUF files through the `gguf` package's reader.

The header names the architecture (`general.architecture`), its hyper-parameters
(`{arch}.context_length`, `{arch}.embedding_length`, ...), the quantization
(`general.file_type`, a `gguf.LlamaFileType`), the tokenizer and the chat template.
The parameter count is the sum of the tensors' element counts. The reader memory-maps
the file, so nothing is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catalog_service.detection.common import CardMetadata, as_float, as_int, as_str_list
from catalog_service.detection.llm import compatible_model_types
from catalog_service.paths import is_special, not_regular_error
from modelyard.catalog.v1 import model_pb2
from server_kit.errors import InvalidArgument

log = logging.getLogger(__name__)

GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mistral3": "Mistral3ForConditionalGeneration",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gptneox": "GPTNeoXForCausalLM",
    "gptj": "GPTJForCausalLM",
    "falcon": "FalconForCausalLM",
    "bloom": "BloomForCausalLM",
    "mpt": "MptForCausalLM",
    "phi2": "PhiForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "starcoder": "GPTBigCodeForCausalLM",
    "starcoder2": "Starcoder2ForCausalLM",
    "stablelm": "StableLmForCausalLM",
    "command-r": "CohereForCausalLM",
    "olmo": "OlmoForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "deepseek2": "DeepseekV2ForCausalLM",
    "granite": "GraniteForCausalLM",
    "nemotron": "NemotronForCausalLM",
    "mamba": "MambaForCausalLM",
}
"""GGUF `general.architecture` -> transformers architecture class (known ones only)."""

GGUF_MODEL_TYPES: dict[str, str] = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gptneox": "gpt_neox",
    "phi2": "phi",
    "starcoder": "gpt_bigcode",
    "command-r": "cohere",
    "deepseek2": "deepseek_v2",
}
"""GGUF architecture names that differ from the transformers `model_type`; others are equal."""

UNQUANTIZED_DTYPES: dict[str, str] = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
}


@dataclass
class GgufDetection:
    """What a GGUF header says: the LLM config, and card-like metadata (`general.*`)."""

    config: model_pb2.LlmConfig
    card: CardMetadata
    name: str = ""


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def _token(reader: Any, key: str) -> str | None:
    """The token string of the special-token id stored at `key`, when the token list is present."""
    token_id = as_int(_field(reader, key))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if token_id is None or tokens is None or not 0 <= token_id < len(tokens.data):
        return None
    try:
        value = tokens.contents(token_id)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    return value if isinstance(value, str) else None


def quantization_bits(type_name: str) -> int | None:
    """Bits per weight named by a GGUF file or tensor type (`MOSTLY_Q4_K_M` -> 4, `F16` -> 16)."""
    name = type_name.removeprefix("MOSTLY_").removeprefix("ALL_")
    match = re.match(r"^(?:I?Q|TQ)(\d+)", name)
    if match:
        return int(match.group(1))
    match = re.match(r"^B?F(\d+)$", name)
    if match:
        return int(match.group(1))
    match = re.match(r"^(?:MX|NV)FP(\d+)", name)
    if match:
        return int(match.group(1))
    return None


def open_reader(path: Path) -> Any:
    """A `gguf.GGUFReader` for `path`.

    Raises:
        InvalidArgument: `CORRUPT_WEIGHTS` when the file is not a readable GGUF file
            (bad magic, truncated header or tensor data).
    """
    import gguf

    if is_special(path):
        raise not_regular_error(path.name)  # a FIFO would block the reader forever
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, TypeError) as exc:
        # the reader's own words can quote bytes of the file: only the kind of failure is told
        log.info("GGUF file %s does not read: %s", path, exc)
        raise InvalidArgument(
            f"{path.name} is not a readable GGUF file ({type(exc).__name__}). "
            "The file is probably truncated or damaged; download or copy it again.",
            reason="CORRUPT_WEIGHTS",
            metadata={"file": path.name},
        ) from exc


def detect_gguf(path: Path) -> GgufDetection:
    """The `LlmConfig` of a GGUF file, from its header only.

    Raises:
        InvalidArgument: `CORRUPT_WEIGHTS` for an unreadable or truncated file.
    """
    import gguf

    reader = open_reader(path)
    llm = model_pb2.LlmConfig(weight_format=model_pb2.WEIGHT_FORMAT_GGUF)
    arch = _field(reader, "general.architecture")
    arch = arch if isinstance(arch, str) else ""
    if arch:
        llm.model_type = GGUF_MODEL_TYPES.get(arch, arch)
        llm.compatible_model_types.extend(compatible_model_types(llm.model_type))
        architecture = GGUF_ARCHITECTURES.get(arch)
        if architecture:
            llm.architecture = architecture

        def number(key: str) -> int | None:
            value = _field(reader, f"{arch}.{key}")
            if isinstance(value, list):  # per-layer values (e.g. head_count_kv): the largest
                numbers = [n for n in (as_int(v) for v in value) if n is not None]
                return max(numbers) if numbers else None
            return as_int(value)

        for key, attribute in (
            ("context_length", "context_length"),
            ("embedding_length", "hidden_size"),
            ("block_count", "num_layers"),
            ("attention.head_count", "num_attention_heads"),
            ("attention.head_count_kv", "num_key_value_heads"),
            ("vocab_size", "vocab_size"),
        ):
            value = number(key)
            if value is not None:
                # Over the field's int32/int64 range: left unknown.
                with contextlib.suppress(ValueError):
                    setattr(llm, attribute, value)
        scaling_type = _field(reader, f"{arch}.rope.scaling.type")
        if isinstance(scaling_type, str) and scaling_type not in ("", "none"):
            llm.rope_scaling.type = scaling_type
            factor = as_float(_field(reader, f"{arch}.rope.scaling.factor"))
            if factor is not None:
                llm.rope_scaling.factor = factor

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if not llm.HasField("vocab_size") and tokens is not None:
        llm.vocab_size = len(tokens.data)

    file_type = as_int(_field(reader, "general.file_type"))
    type_name = ""
    if file_type is not None:
        try:
            type_name = gguf.LlamaFileType(file_type).name
        except ValueError:
            type_name = ""
        if type_name == "GUESSED":
            type_name = ""
    if not type_name:
        type_name = _dominant_tensor_type(reader)
    short = type_name.removeprefix("MOSTLY_").removeprefix("ALL_")
    if short in UNQUANTIZED_DTYPES:
        llm.dtype = UNQUANTIZED_DTYPES[short]
    elif short:
        llm.dtype = short.lower()
        llm.quantization.method = "gguf"
        llm.quantization.type = type_name
        bits = quantization_bits(type_name)
        if bits is not None:
            llm.quantization.bits = bits

    llm.parameter_count = sum(int(t.n_elements) for t in reader.tensors)

    tokenizer = llm.tokenizer
    for role, key in (
        ("bos", "tokenizer.ggml.bos_token_id"),
        ("eos", "tokenizer.ggml.eos_token_id"),
        ("pad", "tokenizer.ggml.padding_token_id"),
        ("unk", "tokenizer.ggml.unknown_token_id"),
    ):
        token = _token(reader, key)
        if token is not None:
            setattr(tokenizer, f"{role}_token", token)
    template = _field(reader, "tokenizer.chat_template")
    if isinstance(template, str) and template:
        tokenizer.chat_template = template
        tokenizer.chat_template_sha256 = hashlib.sha256(template.encode("utf-8")).hexdigest()

    card = CardMetadata(
        author=str(_field(reader, "general.author") or _field(reader, "general.organization") or ""),
        license=str(_field(reader, "general.license") or ""),
        tags=as_str_list(_field(reader, "general.tags")),
        languages=as_str_list(_field(reader, "general.languages")),
    )
    name = _field(reader, "general.name")
    return GgufDetection(config=llm, card=card, name=name if isinstance(name, str) else "")


def _dominant_tensor_type(reader: Any) -> str:
    """The tensor type (e.g. `Q4_K`) of most elements in 2-D tensors, when no file type is stated."""
    counts: Counter[str] = Counter()
    for tensor in reader.tensors:
        if len(tensor.shape) >= 2:
            counts[tensor.tensor_type.name] += int(tensor.n_elements)
    if not counts:
        return ""
    return max(sorted(counts), key=lambda k: counts[k])
