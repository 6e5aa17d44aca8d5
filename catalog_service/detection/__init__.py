"""Detect what a model folder or file is, and its typed config, from the files alone.

`detect(path)` dispatches on what it finds:

=====================================  =============================================
folder with `adapter_config.json`      peft (LoRA) adapter -> `LlmConfig.adapter`
folder with `model_index.json`         diffusers pipeline -> `ImageConfig` / `VideoConfig`
folder with `config.json`              transformers model -> `LlmConfig` (`AudioConfig`
                                       for speech architectures such as Whisper)
folder with one `.gguf` / a `.gguf`    llama.cpp GGUF -> `LlmConfig`
one `.safetensors` (or a folder with   image single file (checkpoint, LoRA, embedding,
only one)                              VAE) by tensor names, else an LLM-shaped file
=====================================  =============================================

A field the files do not state stays unset and is listed in `Detection.missing_fields`
(ValidateModel reports them). Bad input raises domain errors: `NotFound`
(`PATH_NOT_FOUND`), `InvalidArgument` with reason `EMPTY_MODEL_FOLDER`,
`UNRECOGNIZED_MODEL`, `CORRUPT_JSON` or `CORRUPT_WEIGHTS`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from catalog_service.detection.common import (
    GGUF_SUFFIX,
    SAFETENSORS_SUFFIX,
    CardMetadata,
    read_json_object,
    read_model_card,
)
from catalog_service.detection.gguf import detect_gguf
from catalog_service.detection.image import (
    detect_image_file,
    detect_image_folder,
    detect_video_folder,
    is_video_pipeline,
    read_model_index,
)
from catalog_service.detection.llm import (
    audio_task,
    compatible_model_types,
    detect_adapter,
    detect_audio,
    detect_llm,
    recommended_model_type,
)
from catalog_service.detection.safetensors_header import dominant_dtype, read_header
from catalog_service.paths import is_special, not_regular_error
from modelyard.catalog.v1 import model_pb2
from server_kit.errors import InvalidArgument, NotFound

__all__ = [
    "Detection",
    "ModelConfig",
    "compatible_model_types",
    "detect",
    "missing_fields",
    "recommended_model_type",
]

Kind: TypeAlias = model_pb2.ModelKind.ValueType
WeightFormat: TypeAlias = model_pb2.WeightFormat.ValueType
ModelConfig: TypeAlias = (
    model_pb2.LlmConfig | model_pb2.ImageConfig | model_pb2.AudioConfig | model_pb2.VideoConfig
)

LOOKED_FOR = (
    "adapter_config.json (LoRA adapter), model_index.json (diffusers pipeline), "
    "config.json (transformers model), a .gguf file, or a single .safetensors file "
    "(image checkpoint, LoRA, embedding, VAE or LLM weights)"
)

LLM_SINGLE_FILE = re.compile(
    r"^(model\.)?(layers|h|blocks|decoder\.layers|transformer\.h|transformer\.layers|gpt_neox\.layers)\.\d+\."
)
"""Tensor names of transformer blocks in LLM weights (`model.layers.0.self_attn...`)."""

LLM_FIELDS: tuple[str, ...] = (
    "architecture",
    "model_type",
    "context_length",
    "vocab_size",
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "dtype",
    "parameter_count",
    "weight_format",
    "tokenizer.eos_token",
    "tokenizer.chat_template",
)
ADAPTER_FIELDS: tuple[str, ...] = (
    "adapter.adapter_type",
    "adapter.base_model_name_or_path",
    "adapter.rank",
    "adapter.alpha",
    "adapter.target_modules",
    "architecture",
    "model_type",
    "parameter_count",
    "weight_format",
)
IMAGE_FIELDS: dict[int, tuple[str, ...]] = {
    model_pb2.CHECKPOINT_TYPE_CHECKPOINT: ("base_model", "pipeline_class", "resolution", "parameter_count"),
    model_pb2.CHECKPOINT_TYPE_LORA: (
        "base_model",
        "lora_rank",
        "lora_alpha",
        "trigger_words",
        "parameter_count",
    ),
    model_pb2.CHECKPOINT_TYPE_EMBEDDING: ("base_model", "trigger_words"),
    model_pb2.CHECKPOINT_TYPE_VAE: ("parameter_count",),
}
AUDIO_FIELDS: tuple[str, ...] = ("architecture", "model_type", "task", "sample_rate", "parameter_count")
VIDEO_FIELDS: tuple[str, ...] = ("pipeline_class", "num_frames", "parameter_count")


@dataclass
class Detection:
    """What a model is, as read from its files.

    Attributes:
        kind: `model_pb2.ModelKind` value.
        config: the typed config (one of LlmConfig / ImageConfig / AudioConfig / VideoConfig).
        weight_format: `model_pb2.WeightFormat` value of the weight files.
        layout: how the files are laid out: `transformers`, `adapter`, `gguf`, `diffusers`,
            `single_file`.
        missing_fields: config fields (proto paths) the files did not state.
        author, license, tags, languages: from the model card front matter (README.md) or
            file metadata, when stated.
        name: a name the files give the model (GGUF `general.name`), when any.
    """

    kind: Kind
    config: ModelConfig
    weight_format: WeightFormat = model_pb2.WEIGHT_FORMAT_UNSPECIFIED
    layout: str = ""
    missing_fields: list[str] = field(default_factory=list)
    author: str = ""
    license: str = ""
    tags: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)
    name: str = ""

    @property
    def config_field(self) -> str:
        """The `Model.config` oneof field this config goes to: `llm`, `image`, `audio`, `video`."""
        return {
            "LlmConfig": "llm",
            "ImageConfig": "image",
            "AudioConfig": "audio",
            "VideoConfig": "video",
        }[self.config.DESCRIPTOR.name]

    def apply_to(self, model: model_pb2.Model) -> None:
        """Set `model.kind` and its config oneof; fill author/license/tags it lacks."""
        model.kind = self.kind
        getattr(model, self.config_field).CopyFrom(self.config)
        model.author = model.author or self.author
        model.license = model.license or self.license
        model.tags.extend(t for t in self.tags if t not in model.tags)


def _has(message: Any, path: str) -> bool:
    *parents, leaf = path.split(".")
    for name in parents:
        if not message.HasField(name):
            return False
        message = getattr(message, name)
    descriptor = message.DESCRIPTOR.fields_by_name[leaf]
    value = getattr(message, leaf)
    if descriptor.is_repeated:
        return len(value) > 0
    if descriptor.has_presence:
        return bool(message.HasField(leaf))
    return bool(value)


def missing_fields(config: ModelConfig, layout: str = "") -> list[str]:
    """The expected config fields (proto paths) that are unset for this kind of model."""
    if isinstance(config, model_pb2.LlmConfig):
        expected = ADAPTER_FIELDS if config.HasField("adapter") else LLM_FIELDS
    elif isinstance(config, model_pb2.ImageConfig):
        expected = IMAGE_FIELDS.get(config.checkpoint_type, ("checkpoint_type", "base_model"))
        if layout == "diffusers":
            expected = (*expected, "samplers", "vae")
    elif isinstance(config, model_pb2.AudioConfig):
        expected = AUDIO_FIELDS
    else:
        expected = VIDEO_FIELDS
    return [path for path in expected if not _has(config, path)]


def _finish(
    kind: Kind,
    config: ModelConfig,
    weight_format: WeightFormat,
    layout: str,
    card: CardMetadata,
    name: str = "",
) -> Detection:
    if isinstance(config, model_pb2.LlmConfig) and card.languages and not config.languages:
        config.languages.extend(card.languages)
    return Detection(
        kind=kind,
        config=config,
        weight_format=weight_format,
        layout=layout,
        missing_fields=missing_fields(config, layout),
        author=card.author,
        license=card.license,
        tags=list(card.tags),
        languages=list(card.languages),
        name=name,
    )


def _unrecognized(path: Path, found: Sequence[str], hint: str = "") -> InvalidArgument:
    listing = ", ".join(sorted(found)[:12]) + (" ..." if len(found) > 12 else "")
    message = f"{path.name or path} is not a model this catalog recognizes: looked for {LOOKED_FOR}"
    message += f"; found {listing}." if found else "."
    if hint:
        message += " " + hint
    return InvalidArgument(message, reason="UNRECOGNIZED_MODEL", metadata={"path": str(path)})


def detect(path: Path | str, *, allowed_roots: Sequence[Path] | None = None) -> Detection:
    """Detect the kind and typed config of the model at `path` (a folder or a single file).

    Args:
        path: an already confined, resolved path (see `catalog_service.sources`).
        allowed_roots: where an adapter's local base model may be read from (None: anywhere).

    Raises:
        NotFound: `PATH_NOT_FOUND`.
        InvalidArgument: `EMPTY_MODEL_FOLDER`, `UNRECOGNIZED_MODEL`, `CORRUPT_JSON`,
            `CORRUPT_WEIGHTS`.
    """
    path = Path(path)
    if not path.exists():
        raise NotFound(f"{path} does not exist.", reason="PATH_NOT_FOUND", metadata={"path": str(path)})
    if is_special(path):
        raise not_regular_error(path.name)
    if path.is_file():
        return _detect_file(path, CardMetadata())
    return _detect_folder(path, allowed_roots)


def _detect_folder(folder: Path, allowed_roots: Sequence[Path] | None) -> Detection:
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise InvalidArgument(
            f"{folder.name or folder} is empty: put the model's files (config.json and weights, "
            "a diffusers pipeline, or a .safetensors/.gguf file) in it.",
            reason="EMPTY_MODEL_FOLDER",
            metadata={"path": str(folder)},
        )
    card = read_model_card(folder)

    if (folder / "adapter_config.json").is_file():
        llm = detect_adapter(folder, allowed_roots=allowed_roots)
        return _finish(model_pb2.MODEL_KIND_LLM, llm, llm.weight_format, "adapter", card)

    if (folder / "model_index.json").is_file():
        pipeline_class = str(read_model_index(folder).get("_class_name") or "")
        if is_video_pipeline(pipeline_class):
            video = detect_video_folder(folder)
            weight_format = (
                model_pb2.WEIGHT_FORMAT_SAFETENSORS
                if video.HasField("parameter_count")
                else model_pb2.WEIGHT_FORMAT_UNSPECIFIED
            )
            return _finish(model_pb2.MODEL_KIND_VIDEO, video, weight_format, "diffusers", card)
        image = detect_image_folder(folder)
        card.merge(CardMetadata(license=image.license, tags=list(image.tags)))
        return _finish(model_pb2.MODEL_KIND_IMAGE, image, image.weight_format, "diffusers", card)

    if (folder / "config.json").is_file():
        raw = read_json_object(folder / "config.json", base=folder)
        if "_class_name" in raw and "_diffusers_version" in raw:
            raise _unrecognized(
                folder,
                [p.name for p in entries],
                f"config.json describes one diffusers component ({raw['_class_name']}); import the "
                "pipeline folder that holds model_index.json instead.",
            )
        task = audio_task(raw)
        if task:
            audio = detect_audio(folder, task)
            weight_format = (
                model_pb2.WEIGHT_FORMAT_SAFETENSORS
                if audio.HasField("parameter_count")
                else model_pb2.WEIGHT_FORMAT_UNSPECIFIED
            )
            return _finish(model_pb2.MODEL_KIND_AUDIO, audio, weight_format, "transformers", card)
        llm = detect_llm(folder)
        return _finish(model_pb2.MODEL_KIND_LLM, llm, llm.weight_format, "transformers", card)

    gguf_files = sorted(p for p in entries if p.is_file() and p.suffix == GGUF_SUFFIX)
    if len(gguf_files) == 1:
        return _detect_file(gguf_files[0], card)
    if len(gguf_files) > 1:
        raise _unrecognized(
            folder,
            [p.name for p in entries],
            "The folder holds several GGUF files; import the one you want as a single file.",
        )
    weights = sorted(p for p in entries if p.is_file() and p.suffix == SAFETENSORS_SUFFIX)
    if len(weights) == 1:
        return _detect_file(weights[0], card)
    raise _unrecognized(folder, [p.name + ("/" if p.is_dir() else "") for p in entries])


def _detect_file(path: Path, card: CardMetadata) -> Detection:
    if path.suffix == GGUF_SUFFIX:
        found = detect_gguf(path)
        card.merge(found.card)
        return _finish(
            model_pb2.MODEL_KIND_LLM, found.config, model_pb2.WEIGHT_FORMAT_GGUF, "gguf", card, found.name
        )
    if path.suffix != SAFETENSORS_SUFFIX:
        raise _unrecognized(
            path, [path.name], "Single files must be .safetensors or .gguf (pickle files are not loaded)."
        )
    header = read_header(path)
    image = detect_image_file(path, header)
    if image is not None:
        card.merge(CardMetadata(license=image.license, tags=list(image.tags)))
        return _finish(
            model_pb2.MODEL_KIND_IMAGE, image, model_pb2.WEIGHT_FORMAT_SAFETENSORS, "single_file", card
        )
    if any(LLM_SINGLE_FILE.match(name) for name in header.tensors):
        llm = model_pb2.LlmConfig(
            weight_format=model_pb2.WEIGHT_FORMAT_SAFETENSORS,
            parameter_count=header.parameter_count,
        )
        llm.dtype = dominant_dtype(header.dtype_counts())
        return _finish(
            model_pb2.MODEL_KIND_LLM, llm, model_pb2.WEIGHT_FORMAT_SAFETENSORS, "single_file", card
        )
    sample = sorted(header.tensors)[:5]
    raise _unrecognized(
        path,
        [],
        f"Its {len(header.tensors)} tensors (e.g. {', '.join(sample) or 'none'}) match no image checkpoint, "
        "LoRA, embedding, VAE or LLM layout.",
    )
