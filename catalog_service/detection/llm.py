"""Detection of transformers model folders: LLMs, LoRA adapters and audio models.

Everything comes from the files: `config.json` (through a real transformers
`PretrainedConfig` when transformers knows the `model_type`, raw JSON otherwise),
the tokenizer files, `generation_config.json`, `adapter_config.json` and the
safetensors headers. A field the files do not state stays unset; class defaults of
transformers are never reported as facts of the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from catalog_service.detection.common import (
    GGUF_SUFFIX,
    PICKLE_SUFFIXES,
    as_float,
    as_int,
    as_str_list,
    is_pickle_weights,
    read_json_if_present,
    read_json_object,
)
from catalog_service.detection.safetensors_header import (
    WeightSet,
    model_weight_files,
    read_headers,
)
from modelyard.catalog.v1 import model_pb2
from server_kit.errors import InvalidArgument

log = logging.getLogger(__name__)

CONTEXT_LENGTH_KEYS: tuple[str, ...] = (
    "max_position_embeddings",
    "n_positions",
    "n_ctx",
    "seq_length",
    "max_sequence_length",
    "max_seq_len",
    "max_seq_length",
    "seq_len",
)
"""config.json keys families use for the context length, in order of preference."""

VOCAB_KEYS: tuple[str, ...] = ("vocab_size", "n_vocab", "padded_vocab_size")
LAYER_KEYS: tuple[str, ...] = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
HIDDEN_KEYS: tuple[str, ...] = ("hidden_size", "n_embd", "d_model", "model_dim", "dim")
HEAD_KEYS: tuple[str, ...] = ("num_attention_heads", "n_head", "num_heads", "n_heads")
KV_HEAD_KEYS: tuple[str, ...] = ("num_key_value_heads", "n_head_kv", "num_kv_heads", "multi_query_group_num")

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer.model",
    "tiktoken.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Files that hold a tokenizer's vocabulary (one of them must be present for an LLM folder)."""

SPECIAL_TOKEN_ROLES: tuple[str, ...] = ("bos", "eos", "pad", "unk")


# --------------------------------------------------------------------------- config.json


def load_pretrained_config(folder: Path) -> Any | None:
    """`AutoConfig.from_pretrained(folder, trust_remote_code=False)`, or None when it fails.

    Fails (None) for a `model_type` transformers does not know, for configs that need
    remote code, or for configs transformers rejects; the caller then uses the raw JSON.
    The result is a real `PretrainedConfig` instance.
    """
    from transformers import AutoConfig, PretrainedConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # transformers raises ValueError, KeyError, OSError, ... for odd configs
        log.info("transformers cannot load %s/config.json (%s); using the raw JSON", folder, exc)
        return None
    return config if isinstance(config, PretrainedConfig) else None


@lru_cache(maxsize=256)
def _compatible_model_types(model_type: str) -> tuple[str, ...]:
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    class_name = CONFIG_MAPPING_NAMES.get(model_type)
    if class_name is None:
        return ()
    target = CONFIG_MAPPING[model_type]
    same: list[str] = []
    for other, other_name in CONFIG_MAPPING_NAMES.items():
        if other_name != class_name:
            continue
        try:
            if CONFIG_MAPPING[other] is target:
                same.append(other)
        except (KeyError, ImportError, AttributeError):
            continue
    return tuple(sorted(same))


def compatible_model_types(model_type: str) -> list[str]:
    """Model types whose config class in transformers' `CONFIG_MAPPING` is `model_type`'s class.

    Includes `model_type` itself; empty when transformers does not know `model_type`.
    """
    if not model_type:
        return []
    return list(_compatible_model_types(model_type))


def recommended_model_type(model_type: str) -> str:
    """The model type to use: the detected one when transformers knows it, else `""`."""
    return model_type if model_type in compatible_model_types(model_type) else ""


def _text_parts(config: Any | None, raw: dict[str, Any]) -> list[tuple[Any | None, dict[str, Any]]]:
    """(config object, raw dict) pairs to look up values in: the top level, then a text sub-config."""
    parts: list[tuple[Any | None, dict[str, Any]]] = [(config, raw)]
    for key in ("text_config", "llm_config", "language_config"):
        sub_raw = raw.get(key)
        if isinstance(sub_raw, dict):
            sub_config = getattr(config, key, None) if config is not None else None
            parts.append((sub_config, sub_raw))
            break
    return parts


def config_value(config: Any | None, raw: dict[str, Any], standard: str, aliases: Sequence[str] = ()) -> Any:
    """A config value stated by the files: the transformers attribute when its JSON key is
    present (so `n_positions` of GPT-2 answers `max_position_embeddings`), else the first raw
    JSON alias present. Class defaults of transformers never leak in."""
    for cfg, data in _text_parts(config, raw):
        if cfg is not None:
            attribute_map = getattr(cfg, "attribute_map", None) or {}
            json_key = attribute_map.get(standard, standard)
            if json_key in data or standard in data:
                try:
                    value = getattr(cfg, standard, None)
                except Exception:  # e.g. a per-layer attribute read globally (transformers 5)
                    value = None
                if value is not None:
                    return value
        for key in (standard, *aliases):
            if data.get(key) is not None:
                return data[key]
    return None


def attention_free(config: Any | None) -> bool:
    """True when transformers' config says no layer uses softmax attention (Mamba, Mamba-2:
    every entry of `layer_types` is `linear_attention`); their `num_heads`/`head_dim` are the
    state-space heads, which no attention kernel sees."""
    layer_types = getattr(config, "layer_types", None) if config is not None else None
    if not isinstance(layer_types, (list, tuple)) or not layer_types:
        return False
    return all(kind == "linear_attention" for kind in layer_types)


def _head_dim(config: Any | None, raw: dict[str, Any], llm: model_pb2.LlmConfig) -> Any:
    """`head_dim` as config.json states it (Gemma, Qwen3 ...), else hidden size / heads."""
    stated = config_value(config, raw, "head_dim", ("attention_head_dim", "kv_channels"))
    if stated is not None:
        return stated
    heads = llm.num_attention_heads if llm.HasField("num_attention_heads") else 0
    if llm.HasField("hidden_size") and heads > 0 and llm.hidden_size % heads == 0:
        return llm.hidden_size // heads
    return None


def _dtype_name(value: Any) -> str:
    if value is None:
        return ""
    text = str(value)
    text = text.removeprefix("torch.")
    return "" if text in ("auto", "None") else text


def _quantization(raw: dict[str, Any]) -> model_pb2.Quantization | None:
    qc = raw.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = qc.get("quant_method")
    four = qc.get("load_in_4bit") is True
    eight = qc.get("load_in_8bit") is True
    if not isinstance(method, str) or not method:
        method = "bitsandbytes" if (four or eight) else ""
    if not method:
        return None
    quant = model_pb2.Quantization(method=str(method))
    bits = as_int(qc.get("bits")) or as_int(qc.get("w_bit")) or as_int(qc.get("weight_bits"))
    if bits is None and method == "bitsandbytes":
        bits = 4 if four else 8 if eight else None
    if bits is None and method in ("fp8", "fbgemm_fp8"):
        bits = 8
    if bits is None and method == "mxfp4":
        bits = 4
    if bits is not None:
        quant.bits = bits
    for key in ("bnb_4bit_quant_type", "fmt", "version", "format"):
        value = qc.get(key)
        if isinstance(value, str) and value and (key != "bnb_4bit_quant_type" or four):
            quant.type = value
            break
    return quant


def _rope_scaling(config: Any | None, raw: dict[str, Any]) -> model_pb2.RopeScaling | None:
    for _cfg, data in _text_parts(config, raw):
        for key in ("rope_scaling", "rope_parameters"):
            value = data.get(key)
            if not isinstance(value, dict):
                continue
            rope_type = value.get("rope_type") or value.get("type")
            factor = as_float(value.get("factor"))
            if not isinstance(rope_type, str) or rope_type == "default":
                if factor is None:
                    continue
                rope_type = rope_type if isinstance(rope_type, str) else ""
            scaling = model_pb2.RopeScaling(type=rope_type)
            if factor is not None:
                scaling.factor = factor
            return scaling
    return None


# --------------------------------------------------------------------------- tokenizer


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer files: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def chat_template_of(folder: Path, tokenizer_config: dict[str, Any] | None) -> str | None:
    """The chat template: `chat_template.jinja`, `chat_template.json`, then tokenizer_config.json.

    A list of named templates picks the one called `default` (else the first).
    """
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template_json = read_json_if_present(folder / "chat_template.json", base=folder)
    candidates: list[Any] = []
    if template_json is not None:
        candidates.append(template_json.get("chat_template"))
    if tokenizer_config is not None:
        candidates.append(tokenizer_config.get("chat_template"))
    for value in candidates:
        if isinstance(value, str) and value:
            return value
        if isinstance(value, list):
            named = [t for t in value if isinstance(t, dict) and isinstance(t.get("template"), str)]
            for item in named:
                if item.get("name") == "default":
                    return str(item["template"])
            if named:
                return str(named[0]["template"])
    return None


def _token_by_id(tokenizer_json: dict[str, Any] | None, token_id: int) -> str | None:
    if tokenizer_json is None:
        return None
    for added in tokenizer_json.get("added_tokens") or []:
        if isinstance(added, dict) and added.get("id") == token_id and isinstance(added.get("content"), str):
            return str(added["content"])
    model = tokenizer_json.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        for token, index in vocab.items():
            if index == token_id:
                return str(token)
    if isinstance(vocab, list) and 0 <= token_id < len(vocab):
        entry = vocab[token_id]
        if isinstance(entry, list) and entry and isinstance(entry[0], str):
            return entry[0]
    return None


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return as_int(value)


def tokenizer_info(
    folder: Path,
    raw_config: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
) -> model_pb2.TokenizerInfo:
    """Tokenizer facts of `folder`: special tokens, tokenizer class, chat template and its sha256.

    Tokens come from tokenizer_config.json, then special_tokens_map.json, then (by id, from
    generation_config.json / config.json) from tokenizer.json.
    """
    info = model_pb2.TokenizerInfo()
    tokenizer_config = read_json_if_present(folder / "tokenizer_config.json", base=folder)
    special_map = read_json_if_present(folder / "special_tokens_map.json", base=folder)
    tokenizer_json: dict[str, Any] | None = None
    if (folder / "tokenizer.json").is_file():
        tokenizer_json = read_json_object(folder / "tokenizer.json", base=folder)

    if tokenizer_config is not None and isinstance(tokenizer_config.get("tokenizer_class"), str):
        info.tokenizer_class = str(tokenizer_config["tokenizer_class"])
    for role in SPECIAL_TOKEN_ROLES:
        key = f"{role}_token"
        token: str | None = None
        for source in (tokenizer_config, special_map):
            if source is not None and token is None:
                token = _token_text(source.get(key))
        if token is None:
            for source in (generation_config, raw_config):
                token_id = _first_id(source.get(f"{role}_token_id")) if source is not None else None
                if token_id is not None:
                    token = _token_by_id(tokenizer_json, token_id)
                    if token is not None:
                        break
        if token is not None:
            setattr(info, key, token)
    template = chat_template_of(folder, tokenizer_config)
    if template is not None:
        info.chat_template = template
        info.chat_template_sha256 = hashlib.sha256(template.encode("utf-8")).hexdigest()
    return info


def has_tokenizer(folder: Path) -> bool:
    """Whether `folder` holds a tokenizer vocabulary file (or a GGUF with one)."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


# --------------------------------------------------------------------------- weights


def weight_format_of(folder: Path, stem: str = "model") -> int:
    """The weight format of the model in `folder` (safetensors preferred over pickles over GGUF)."""
    if model_weight_files(folder, stem):
        return model_pb2.WEIGHT_FORMAT_SAFETENSORS
    if any(is_pickle_weights(p.name) for p in folder.iterdir() if p.is_file()):
        return model_pb2.WEIGHT_FORMAT_PYTORCH_BIN
    if any(p.suffix == GGUF_SUFFIX for p in folder.iterdir() if p.is_file()):
        return model_pb2.WEIGHT_FORMAT_GGUF
    return model_pb2.WEIGHT_FORMAT_UNSPECIFIED


def safetensors_weights(folder: Path, stem: str = "model") -> WeightSet | None:
    """The headers of the model's safetensors files in `folder` (None when there are none)."""
    files = model_weight_files(folder, stem)
    if not files:
        return None
    return read_headers(files, base=folder)


# --------------------------------------------------------------------------- LLM


def llm_task(architecture: str, raw: dict[str, Any]) -> model_pb2.LlmTask.ValueType:
    """What a model computes, from its architecture's head (and `num_labels` / `id2label`)."""
    if architecture.endswith("ForSequenceClassification"):
        labels = raw.get("num_labels")
        if not isinstance(labels, int):
            id2label = raw.get("id2label")
            labels = len(id2label) if isinstance(id2label, dict) else 2  # transformers' default
        return model_pb2.LLM_TASK_REWARD_MODEL if labels == 1 else model_pb2.LLM_TASK_SEQUENCE_CLASSIFICATION
    if architecture.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
        return model_pb2.LLM_TASK_TEXT_GENERATION
    return model_pb2.LLM_TASK_UNSPECIFIED


def detect_llm(folder: Path) -> model_pb2.LlmConfig:
    """The `LlmConfig` of a transformers model folder (config.json + tokenizer + weights).

    Raises:
        InvalidArgument: `CORRUPT_JSON` for a JSON file that does not parse,
            `CORRUPT_WEIGHTS` for a safetensors file whose header does not fit the file.
    """
    raw = read_json_object(folder / "config.json", base=folder)
    config = load_pretrained_config(folder)
    llm = model_pb2.LlmConfig()

    architectures = as_str_list(raw.get("architectures"))
    if architectures:
        llm.architecture = architectures[0]
        llm.task = llm_task(architectures[0], raw)
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type:
        llm.model_type = model_type
        llm.compatible_model_types.extend(compatible_model_types(model_type))

    _set_int(llm, "context_length", config_value(config, raw, "max_position_embeddings", CONTEXT_LENGTH_KEYS))
    _set_int(llm, "vocab_size", config_value(config, raw, "vocab_size", VOCAB_KEYS))
    _set_int(llm, "num_layers", config_value(config, raw, "num_hidden_layers", LAYER_KEYS))
    _set_int(llm, "hidden_size", config_value(config, raw, "hidden_size", HIDDEN_KEYS))
    if not attention_free(config):
        _set_int(llm, "num_attention_heads", config_value(config, raw, "num_attention_heads", HEAD_KEYS))
        _set_int(llm, "num_key_value_heads", config_value(config, raw, "num_key_value_heads", KV_HEAD_KEYS))
        if not llm.HasField("num_key_value_heads") and raw.get("multi_query") is True:
            llm.num_key_value_heads = 1  # Falcon-style multi-query attention: one shared KV head
        _set_int(llm, "head_dim", _head_dim(config, raw, llm))
    _set_int(llm, "sliding_window", config_value(config, raw, "sliding_window"))

    rope = _rope_scaling(config, raw)
    if rope is not None:
        llm.rope_scaling.CopyFrom(rope)
    quant = _quantization(raw)
    if quant is not None:
        llm.quantization.CopyFrom(quant)
    llm.requires_remote_code = isinstance(raw.get("auto_map"), dict) and bool(raw["auto_map"])

    generation = read_json_if_present(folder / "generation_config.json", base=folder)
    if generation is not None:
        temperature = as_float(generation.get("temperature"))
        top_p = as_float(generation.get("top_p"))
        if temperature is not None:
            llm.default_temperature = temperature
        if top_p is not None:
            llm.default_top_p = top_p

    llm.tokenizer.CopyFrom(tokenizer_info(folder, raw, generation))

    llm.weight_format = weight_format_of(folder)  # type: ignore[assignment]
    weights = safetensors_weights(folder)
    declared_dtype = _dtype_name(raw.get("dtype") or raw.get("torch_dtype"))
    if not declared_dtype:
        for _cfg, data in _text_parts(None, raw)[1:]:
            declared_dtype = _dtype_name(data.get("dtype") or data.get("torch_dtype"))
    if weights is not None:
        llm.parameter_count = weights.parameter_count
    llm.dtype = declared_dtype or (weights.dtype if weights is not None else "")
    return llm


def _set_int(message: Any, field: str, value: Any) -> None:
    number = as_int(value)
    if number is not None and number >= 0:
        # A value over the field's int32/int64 range is as unknown as a missing one.
        with contextlib.suppress(ValueError):
            setattr(message, field, number)


# --------------------------------------------------------------------------- adapters


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def local_base_folder(
    adapter_folder: Path, base_name: str, allowed_roots: Sequence[Path] | None = None
) -> Path | None:
    """The local folder `base_model_name_or_path` points to, when it has a config.json.

    Relative paths are taken relative to the adapter folder. With `allowed_roots`, a base
    outside them is not read (None).
    """
    if not base_name:
        return None
    candidate = Path(base_name).expanduser()
    if not candidate.is_absolute():
        if base_name.count("/") == 1 and not base_name.startswith("."):
            return None  # a hub id (`org/name`), not a path
        candidate = adapter_folder / candidate
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError):
        return None
    if allowed_roots is not None and not _inside(resolved, [Path(r).resolve() for r in allowed_roots]):
        return None
    return resolved if (resolved / "config.json").is_file() else None


def detect_adapter(folder: Path, *, allowed_roots: Sequence[Path] | None = None) -> model_pb2.LlmConfig:
    """The `LlmConfig` of a peft adapter folder (`adapter_config.json` + adapter weights).

    `adapter` is set; architecture and model_type come from the base model's config.json
    when `base_model_name_or_path` is a local folder (inside `allowed_roots` when given).
    """
    adapter_config = read_json_object(folder / "adapter_config.json", base=folder)
    llm = model_pb2.LlmConfig()
    adapter = llm.adapter
    peft_type = adapter_config.get("peft_type")
    adapter.adapter_type = str(peft_type) if isinstance(peft_type, str) else ""
    base_name = adapter_config.get("base_model_name_or_path")
    adapter.base_model_name_or_path = str(base_name) if isinstance(base_name, str) else ""
    rank = as_int(adapter_config.get("r"))
    if rank is not None:
        adapter.rank = rank
    alpha = as_float(adapter_config.get("lora_alpha"))
    if alpha is not None:
        adapter.alpha = alpha
    adapter.target_modules.extend(sorted(as_str_list(adapter_config.get("target_modules"))))

    base = local_base_folder(folder, adapter.base_model_name_or_path, allowed_roots)
    if base is not None:
        try:
            base_raw = read_json_object(base / "config.json", base=base)
        except InvalidArgument as exc:
            log.warning("ignoring the base model's config.json of adapter %s: %s", folder, exc.message)
            base_raw = {}
        architectures = as_str_list(base_raw.get("architectures"))
        if architectures:
            llm.architecture = architectures[0]
        model_type = base_raw.get("model_type")
        if isinstance(model_type, str) and model_type:
            llm.model_type = model_type
            llm.compatible_model_types.extend(compatible_model_types(model_type))

    weights = safetensors_weights(folder, "adapter_model")
    if weights is not None:
        llm.weight_format = model_pb2.WEIGHT_FORMAT_SAFETENSORS
        llm.parameter_count = weights.parameter_count
        llm.dtype = weights.dtype
    elif any((folder / f"adapter_model{s}").is_file() for s in PICKLE_SUFFIXES):
        llm.weight_format = model_pb2.WEIGHT_FORMAT_PYTORCH_BIN
    if has_tokenizer(folder) or (folder / "tokenizer_config.json").is_file():
        llm.tokenizer.CopyFrom(tokenizer_info(folder))
    return llm


# --------------------------------------------------------------------------- audio


def _audio_tasks() -> dict[str, str]:
    """Architecture class name -> audio task, from transformers' auto mappings."""
    from transformers.models.auto import modeling_auto as auto

    groups = {
        "automatic-speech-recognition": (
            "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
            "MODEL_FOR_CTC_MAPPING_NAMES",
        ),
        "text-to-speech": (
            "MODEL_FOR_TEXT_TO_SPECTROGRAM_MAPPING_NAMES",
            "MODEL_FOR_TEXT_TO_WAVEFORM_MAPPING_NAMES",
        ),
        "audio-classification": ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",),
    }
    tasks: dict[str, str] = {}
    for task, names in groups.items():
        for name in names:
            for value in getattr(auto, name, {}).values():
                for cls in (value,) if isinstance(value, str) else tuple(value):
                    tasks.setdefault(cls, task)
    return tasks


def audio_task(raw_config: dict[str, Any]) -> str:
    """The audio task of a config.json's first architecture (`""` when it is not an audio model)."""
    architectures = as_str_list(raw_config.get("architectures"))
    if not architectures:
        return ""
    return _audio_tasks().get(architectures[0], "")


def detect_audio(folder: Path, task: str) -> model_pb2.AudioConfig:
    """The `AudioConfig` of a transformers audio model folder (Whisper, wav2vec2, SpeechT5 ...)."""
    raw = read_json_object(folder / "config.json", base=folder)
    audio = model_pb2.AudioConfig(task=task)
    architectures = as_str_list(raw.get("architectures"))
    if architectures:
        audio.architecture = architectures[0]
    if isinstance(raw.get("model_type"), str):
        audio.model_type = str(raw["model_type"])
    for name in ("preprocessor_config.json", "feature_extractor_config.json"):
        data = read_json_if_present(folder / name, base=folder)
        rate = as_int(data.get("sampling_rate")) if data is not None else None
        if rate is not None:
            audio.sample_rate = rate
            break
    if not audio.HasField("sample_rate"):
        rate = as_int(raw.get("sampling_rate"))
        if rate is not None:
            audio.sample_rate = rate
    weights = safetensors_weights(folder)
    if weights is not None:
        audio.parameter_count = weights.parameter_count
    return audio
