"""Detection of image (and video) diffusion models.

Two forms:

* a diffusers folder: `model_index.json` names the pipeline class and its components;
  the component configs give the resolution (UNet `sample_size` x VAE scale factor), the
  scheduler (sampler) and the VAE class;
* a single `.safetensors` file, told apart by tensor names and shapes read from its
  header (the key patterns diffusers' `single_file_utils.py` uses): a full SD 1.x / 2.x /
  XL base / XL refiner / inpainting checkpoint, a kohya LoRA (`lora_unet_...`,
  `lora_te...`, `ss_*` metadata), a diffusers/peft LoRA, a textual-inversion embedding
  (`emb_params`, `string_to_param`, `clip_l`/`clip_g`) or a VAE alone.

Sidecar metadata kept beside a single file by image tools (`<name>.civitai.info`,
`<stem>.json`, `<stem>.preview.png`) is read offline and fills what the header cannot say.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from catalog_service.detection.common import (
    SAFETENSORS_SUFFIX,
    as_float,
    as_int,
    as_str_list,
    read_json_if_present,
    read_json_object,
    unique,
)
from catalog_service.detection.safetensors_header import (
    SafetensorsHeader,
    WeightSet,
    index_shards,
    read_header,
    read_headers,
    read_scalar,
)
from catalog_service.paths import inside, model_roots, named_path
from modelyard.catalog.v1 import model_pb2

BaseModel: TypeAlias = model_pb2.ImageBaseModel.ValueType
"""An `ImageBaseModel` enum value."""

LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
INPAINT_KEY = "model.diffusion_model.input_blocks.0.0.weight"
"""The UNet's first convolution: 9 input channels (latents + mask + masked image) for inpainting."""

MAX_TRIGGER_WORDS = 10

VIDEO_PIPELINE_MARKERS: tuple[str, ...] = (
    "Video",
    "AnimateDiff",
    "I2VGen",
    "Wan",
    "LTX",
    "Mochi",
    "CogVideo",
    "Latte",
    "Allegro",
)
"""Substrings of diffusers pipeline class names that generate video."""

PREVIEW_SUFFIXES: tuple[str, ...] = (
    ".preview.png",
    ".preview.jpg",
    ".preview.jpeg",
    ".preview.webp",
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
)


def _family_version(text: str, major: str) -> bool:
    """Whether `text` names Stable Diffusion `major` (`sd_v1`, `SD 1.5`, `stable-diffusion-v2-768`)."""
    return re.search(rf"(^|[^a-z])(sd|stable-diffusion)[ _-]?v?{major}(?![a-z])", text) is not None


def base_model_from_text(text: str) -> BaseModel:
    """An `ImageBaseModel` from a free-text family name.

    Understands kohya `ss_base_model_version` (`sd_v1`, `sd_v2`, `sdxl_base_v1-0`),
    modelspec architectures (`stable-diffusion-xl-v1-base/lora`), civitai `baseModel`
    (`SD 1.5`, `SDXL 1.0`, `Pony`, `Flux.1 D`) and A1111 `sd version` (`SD1`, `SDXL`).
    """
    t = text.strip().lower()
    if not t or t in ("unknown", "other", "none"):
        return model_pb2.IMAGE_BASE_MODEL_UNSPECIFIED
    if "refiner" in t:
        return model_pb2.IMAGE_BASE_MODEL_SDXL_REFINER
    if "flux" in t:
        return model_pb2.IMAGE_BASE_MODEL_FLUX
    if _family_version(t, "3"):
        return model_pb2.IMAGE_BASE_MODEL_SD_3
    if "xl" in t or any(name in t for name in ("pony", "illustrious", "noobai")):
        return model_pb2.IMAGE_BASE_MODEL_SDXL
    if _family_version(t, "2"):
        return model_pb2.IMAGE_BASE_MODEL_SD_2_1
    if _family_version(t, "1"):
        return model_pb2.IMAGE_BASE_MODEL_SD_1_5
    return model_pb2.IMAGE_BASE_MODEL_UNSPECIFIED


# --------------------------------------------------------------------------- diffusers folders


def read_model_index(folder: Path) -> dict[str, Any]:
    """`model_index.json` of a diffusers folder (`CORRUPT_JSON` when it does not parse)."""
    return read_json_object(folder / "model_index.json", base=folder)


def pipeline_components(model_index: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Component name -> (library, class) for every non-null component of `model_index.json`."""
    components: dict[str, tuple[str, str]] = {}
    for name, value in model_index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, cls = value
        if isinstance(library, str) and isinstance(cls, str) and library and cls:
            components[name] = (library, cls)
    return components


def is_video_pipeline(pipeline_class: str) -> bool:
    """Whether a diffusers pipeline class generates video."""
    return any(marker in pipeline_class for marker in VIDEO_PIPELINE_MARKERS)


def component_folder(folder: Path, name: str) -> Path:
    """`folder / name` for a component `name` of `model_index.json`, confined to the pipeline folder.

    Raises:
        PermissionDenied: `PATH_OUTSIDE_ALLOWED_ROOTS` for an absolute name, `..`, or a
            symlink leading out of the pipeline folder.
    """
    return named_path(folder, name, base=folder)


def component_weight_files(component_dir: Path) -> list[Path]:
    """The safetensors files of one diffusers component (a variant only when no plain file exists)."""
    for stem in ("diffusion_pytorch_model", "model"):
        index = component_dir / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards, _ = index_shards(index, base=component_dir.parent)
            return shards
        single = component_dir / f"{stem}{SAFETENSORS_SUFFIX}"
        if single.is_file():
            return [single]
        sharded = sorted(component_dir.glob(f"{stem}-*-of-*{SAFETENSORS_SUFFIX}"))
        if sharded:
            return sharded
    groups: dict[str, list[Path]] = {}
    for path in sorted(component_dir.glob(f"*{SAFETENSORS_SUFFIX}")):
        # `diffusion_pytorch_model.fp16.safetensors` -> group "fp16"
        parts = path.name[: -len(SAFETENSORS_SUFFIX)].split(".")
        groups.setdefault(".".join(parts[1:]), []).append(path)
    return groups[sorted(groups)[0]] if groups else []


def _component_config(folder: Path, name: str) -> dict[str, Any] | None:
    component = component_folder(folder, name)
    for config_name in ("config.json", "scheduler_config.json"):
        data = read_json_if_present(component / config_name, base=folder)
        if data is not None:
            return data
    return None


def pipeline_weights(folder: Path, components: dict[str, tuple[str, str]]) -> WeightSet:
    """The safetensors headers of every component of a diffusers folder."""
    files: list[Path] = []
    for name in components:
        component = component_folder(folder, name)
        if component.is_dir():
            files.extend(component_weight_files(component))
    return read_headers(files, base=folder)


def _sample_size(config: dict[str, Any] | None) -> int | None:
    if config is None:
        return None
    value = config.get("sample_size")
    if isinstance(value, list) and value:
        value = value[0]
    return as_int(value)


def vae_scale_factor(vae_config: dict[str, Any] | None) -> int | None:
    """`2 ** (len(block_out_channels) - 1)`: pixels per latent cell of a diffusers VAE."""
    if vae_config is None:
        return None
    channels = vae_config.get("block_out_channels")
    if not isinstance(channels, list) or not channels:
        return None
    return int(2 ** (len(channels) - 1))


def _folder_base_model(
    pipeline_class: str,
    components: dict[str, tuple[str, str]],
    denoiser: dict[str, Any] | None,
    scheduler: dict[str, Any] | None,
    text_encoder: dict[str, Any] | None,
) -> BaseModel:
    if "Flux" in pipeline_class:
        return model_pb2.IMAGE_BASE_MODEL_FLUX
    if pipeline_class.startswith("StableDiffusion3"):
        return model_pb2.IMAGE_BASE_MODEL_SD_3
    if pipeline_class.startswith("StableDiffusionXL"):
        if "text_encoder" not in components and "text_encoder_2" in components:
            return model_pb2.IMAGE_BASE_MODEL_SDXL_REFINER
        return model_pb2.IMAGE_BASE_MODEL_SDXL
    if pipeline_class.startswith("StableDiffusion") and "Upscale" not in pipeline_class:
        cross_attention = as_int((denoiser or {}).get("cross_attention_dim"))
        text_width = as_int((text_encoder or {}).get("hidden_size"))
        v_prediction = (scheduler or {}).get("prediction_type") == "v_prediction"
        if cross_attention == 1024 or text_width == 1024 or v_prediction:
            return model_pb2.IMAGE_BASE_MODEL_SD_2_1
        return model_pb2.IMAGE_BASE_MODEL_SD_1_5
    return model_pb2.IMAGE_BASE_MODEL_UNSPECIFIED


def detect_image_folder(folder: Path) -> model_pb2.ImageConfig:
    """The `ImageConfig` of a diffusers pipeline folder (`model_index.json` + components).

    Raises:
        InvalidArgument: `CORRUPT_JSON` / `CORRUPT_WEIGHTS` for unreadable files.
    """
    model_index = read_model_index(folder)
    components = pipeline_components(model_index)
    pipeline_class = str(model_index.get("_class_name") or "")
    image = model_pb2.ImageConfig(
        pipeline_class=pipeline_class, checkpoint_type=model_pb2.CHECKPOINT_TYPE_CHECKPOINT
    )
    denoiser_name = "unet" if "unet" in components else "transformer" if "transformer" in components else ""
    denoiser = _component_config(folder, denoiser_name) if denoiser_name else None
    scheduler = _component_config(folder, "scheduler") if "scheduler" in components else None
    text_encoder = _component_config(folder, "text_encoder") if "text_encoder" in components else None
    vae_config = _component_config(folder, "vae") if "vae" in components else None

    image.base_model = _folder_base_model(pipeline_class, components, denoiser, scheduler, text_encoder)
    in_channels = as_int((denoiser or {}).get("in_channels"))
    image.inpainting = "Inpaint" in pipeline_class or (denoiser_name == "unet" and in_channels == 9)
    if "vae" in components:
        image.vae = components["vae"][1]
    if "scheduler" in components:
        image.samplers.append(components["scheduler"][1])
    sample_size = _sample_size(denoiser)
    factor = vae_scale_factor(vae_config)
    if sample_size is not None and factor is not None:
        image.resolution = sample_size * factor

    weights = pipeline_weights(folder, components)
    if weights.headers:
        image.weight_format = model_pb2.WEIGHT_FORMAT_SAFETENSORS
        image.parameter_count = weights.parameter_count
    elif any(p.suffix in (".bin", ".pt", ".pth", ".ckpt") for p in folder.rglob("*") if p.is_file()):
        image.weight_format = model_pb2.WEIGHT_FORMAT_PYTORCH_BIN
    return image


def detect_video_folder(folder: Path) -> model_pb2.VideoConfig:
    """The `VideoConfig` of a diffusers video pipeline folder."""
    model_index = read_model_index(folder)
    components = pipeline_components(model_index)
    pipeline_class = str(model_index.get("_class_name") or "")
    video = model_pb2.VideoConfig(architecture=pipeline_class, pipeline_class=pipeline_class)
    denoiser_name = "unet" if "unet" in components else "transformer" if "transformer" in components else ""
    denoiser = _component_config(folder, denoiser_name) if denoiser_name else None
    frames = as_int((denoiser or {}).get("num_frames"))
    if frames is not None:
        video.num_frames = frames
    weights = pipeline_weights(folder, components)
    if weights.headers:
        video.parameter_count = weights.parameter_count
    return video


# --------------------------------------------------------------------------- single files


def _prefixes(names: list[str]) -> set[str]:
    return {name.split(".", 1)[0] for name in names}


def _cross_attention_base(width: int | None) -> BaseModel:
    """SD family from the UNet cross-attention width (the text encoder's hidden size)."""
    return {
        768: model_pb2.IMAGE_BASE_MODEL_SD_1_5,
        1024: model_pb2.IMAGE_BASE_MODEL_SD_2_1,
        2048: model_pb2.IMAGE_BASE_MODEL_SDXL,
        1280: model_pb2.IMAGE_BASE_MODEL_SDXL_REFINER,
    }.get(width or 0, model_pb2.IMAGE_BASE_MODEL_UNSPECIFIED)


def _embedding_base(width: int | None) -> BaseModel:
    return {768: model_pb2.IMAGE_BASE_MODEL_SD_1_5, 1024: model_pb2.IMAGE_BASE_MODEL_SD_2_1}.get(
        width or 0, model_pb2.IMAGE_BASE_MODEL_UNSPECIFIED
    )


PIPELINE_FOR_BASE: dict[int, str] = {
    model_pb2.IMAGE_BASE_MODEL_SD_1_5: "StableDiffusionPipeline",
    model_pb2.IMAGE_BASE_MODEL_SD_2_1: "StableDiffusionPipeline",
    model_pb2.IMAGE_BASE_MODEL_SDXL: "StableDiffusionXLPipeline",
    model_pb2.IMAGE_BASE_MODEL_SDXL_REFINER: "StableDiffusionXLImg2ImgPipeline",
    model_pb2.IMAGE_BASE_MODEL_SD_3: "StableDiffusion3Pipeline",
    model_pb2.IMAGE_BASE_MODEL_FLUX: "FluxPipeline",
}
"""The diffusers pipeline that loads a full single-file checkpoint of each family."""


def _full_checkpoint(header: SafetensorsHeader, names: list[str]) -> model_pb2.ImageConfig | None:
    has_unet = any(n.startswith(LDM_UNET) for n in names)
    flux = any(n.startswith(("double_blocks.", LDM_UNET + "double_blocks.")) for n in names)
    sd3 = any(n.startswith(("joint_blocks.", LDM_UNET + "joint_blocks.")) for n in names)
    if not (has_unet or flux or sd3):
        return None
    image = model_pb2.ImageConfig(checkpoint_type=model_pb2.CHECKPOINT_TYPE_CHECKPOINT)
    base: BaseModel
    embedders = {
        int(m.group(1)) for n in names if (m := re.match(r"conditioner\.embedders\.(\d+)\.", n)) is not None
    }
    if flux:
        base = model_pb2.IMAGE_BASE_MODEL_FLUX
    elif sd3:
        base = model_pb2.IMAGE_BASE_MODEL_SD_3
    elif embedders:
        # SGM layout (SDXL): the base has CLIP-L (embedders.0.transformer) and OpenCLIP bigG
        # (embedders.1.model); the refiner only OpenCLIP bigG as embedders.0.model.
        clip_l = any(n.startswith("conditioner.embedders.0.transformer.") for n in names)
        base = (
            model_pb2.IMAGE_BASE_MODEL_SDXL
            if (1 in embedders or clip_l)
            else model_pb2.IMAGE_BASE_MODEL_SDXL_REFINER
        )
    elif any(n.startswith("cond_stage_model.model.") for n in names):
        base = model_pb2.IMAGE_BASE_MODEL_SD_2_1  # OpenCLIP ViT-H text encoder: SD 2.x
    elif any(n.startswith("cond_stage_model.transformer.") for n in names):
        base = model_pb2.IMAGE_BASE_MODEL_SD_1_5  # CLIP ViT-L text encoder: SD 1.x
    else:
        to_k = [
            t for n, t in header.tensors.items() if n.startswith(LDM_UNET) and n.endswith("attn2.to_k.weight")
        ]
        base = _cross_attention_base(to_k[0].shape[-1] if to_k else None)
    image.base_model = base
    first_conv = header.get(INPAINT_KEY)
    image.inpainting = first_conv is not None and len(first_conv.shape) == 4 and first_conv.shape[1] == 9
    pipeline = PIPELINE_FOR_BASE.get(base, "")
    if image.inpainting and pipeline in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        pipeline = pipeline.replace("Pipeline", "InpaintPipeline")
    image.pipeline_class = pipeline
    if any(n.startswith(LDM_VAE) for n in names):
        image.vae = "AutoencoderKL"
    return image


def _kohya_trigger_words(metadata: dict[str, str]) -> list[str]:
    """Trigger words of a kohya LoRA: `modelspec.trigger_phrase`, else the most frequent tags.

    From `ss_tag_frequency` (`{dataset: {tag: count}}`), tags whose count is at least half of
    the most frequent tag's, most frequent first (at most 10).
    """
    phrase = metadata.get("modelspec.trigger_phrase", "")
    if phrase.strip():
        return unique(w.strip() for w in phrase.split(",") if w.strip())[:MAX_TRIGGER_WORDS]
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return []
    try:
        frequencies = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, too deep, too many digits
        return []
    counts: Counter[str] = Counter()
    if isinstance(frequencies, dict):
        for dataset in frequencies.values():
            if isinstance(dataset, dict):
                for tag, count in dataset.items():
                    number = as_int(count)
                    if number is not None and str(tag).strip():
                        counts[str(tag).strip()] += number
    if not counts:
        return []
    top = max(counts.values())
    ranked = sorted((tag for tag, n in counts.items() if 2 * n >= top), key=lambda tag: (-counts[tag], tag))
    return ranked[:MAX_TRIGGER_WORDS]


def _resolution_from_text(text: str) -> int | None:
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    return max(numbers) if numbers else None


def _lora(header: SafetensorsHeader, names: list[str]) -> model_pb2.ImageConfig | None:
    kohya = any(
        n.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")) for n in names
    )
    diffusers_lora = any(
        n.startswith(("unet.", "text_encoder.", "text_encoder_2.", "transformer.")) and ("lora" in n)
        for n in names
    )
    if not (kohya or diffusers_lora):
        return None
    image = model_pb2.ImageConfig(checkpoint_type=model_pb2.CHECKPOINT_TYPE_LORA)
    metadata = header.metadata

    base: BaseModel = model_pb2.IMAGE_BASE_MODEL_UNSPECIFIED
    for key in ("ss_base_model_version", "modelspec.architecture"):
        if metadata.get(key):
            base = base_model_from_text(metadata[key])
            if base:
                break
    if not base and metadata.get("ss_v2", "").lower() == "true":
        base = model_pb2.IMAGE_BASE_MODEL_SD_2_1
    if not base:
        if any(n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for n in names):
            base = model_pb2.IMAGE_BASE_MODEL_SDXL
        elif any(n.startswith(("lora_unet_double_blocks", "lora_unet_single_blocks")) for n in names) or any(
            ".single_transformer_blocks." in n for n in names
        ):
            base = model_pb2.IMAGE_BASE_MODEL_FLUX
        elif any(n.startswith("lora_unet_joint_blocks") for n in names):
            base = model_pb2.IMAGE_BASE_MODEL_SD_3
        else:
            to_k = [
                t
                for n, t in header.tensors.items()
                if re.search(r"attn2[._]to_k[._]lora(_down|\.down|_A)\.weight$", n)
            ]
            base = _cross_attention_base(to_k[0].shape[-1] if to_k and len(to_k[0].shape) == 2 else None)
    image.base_model = base

    rank = as_int(metadata.get("ss_network_dim"))
    if rank is None:
        downs = [t for n, t in header.tensors.items() if n.endswith(("lora_down.weight", "lora_A.weight"))]
        if downs and downs[0].shape:
            rank = downs[0].shape[0]
    if rank is not None:
        image.lora_rank = rank
    alpha = as_float(metadata.get("ss_network_alpha"))
    if alpha is None:
        alphas = sorted(n for n in names if n.endswith(".alpha"))
        if alphas:
            alpha = read_scalar(header, alphas[0])
    if alpha is not None:
        image.lora_alpha = alpha

    clip_skip = as_int(metadata.get("ss_clip_skip"))
    if clip_skip is not None:
        image.clip_skip = clip_skip
    resolution = _resolution_from_text(
        metadata.get("ss_resolution", "") or metadata.get("modelspec.resolution", "")
    )
    if resolution is not None:
        image.resolution = resolution
    image.trigger_words.extend(_kohya_trigger_words(metadata))
    for key in ("modelspec.license", "license"):
        if metadata.get(key):
            image.license = metadata[key]
            break
    tags = metadata.get("modelspec.tags", "")
    if tags:
        image.tags.extend(unique(t.strip() for t in tags.split(",") if t.strip()))
    return image


def _embedding(header: SafetensorsHeader, names: list[str], path: Path) -> model_pb2.ImageConfig | None:
    tensors = header.tensors
    image = model_pb2.ImageConfig(checkpoint_type=model_pb2.CHECKPOINT_TYPE_EMBEDDING)
    token = header.metadata.get("name", "").strip()
    if "clip_l" in tensors and "clip_g" in tensors:
        image.base_model = model_pb2.IMAGE_BASE_MODEL_SDXL
    elif "emb_params" in tensors or any(n.startswith("string_to_param") for n in names):
        vector = tensors.get("emb_params") or next(
            t for n, t in tensors.items() if n.startswith("string_to_param")
        )
        image.base_model = _embedding_base(vector.shape[-1] if vector.shape else None)
    elif len(names) == 1 and re.fullmatch(r"<[^<>\s]+>", names[0]):
        # diffusers `learned_embeds.safetensors`: the only key is the placeholder token itself
        vector = tensors[names[0]]
        image.base_model = _embedding_base(vector.shape[-1] if vector.shape else None)
        token = token or names[0]
    else:
        return None
    # A1111 invokes an embedding by its file name when the file does not name its token.
    image.trigger_words.append(token or path.stem)
    return image


VAE_PREFIXES: tuple[str, ...] = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def _vae(names: list[str]) -> model_pb2.ImageConfig | None:
    plain = all(n.startswith(VAE_PREFIXES) for n in names) and any(
        n.startswith(("encoder.", "decoder.")) for n in names
    )
    prefixed = all(n.startswith(LDM_VAE) for n in names)
    if not (plain or prefixed):
        return None
    return model_pb2.ImageConfig(checkpoint_type=model_pb2.CHECKPOINT_TYPE_VAE, vae="AutoencoderKL")


def detect_image_file(path: Path, header: SafetensorsHeader | None = None) -> model_pb2.ImageConfig | None:
    """The `ImageConfig` of a single `.safetensors` file, or None when it is not an image model.

    Only the header is read (plus, for kohya LoRAs without metadata, the 4-byte alpha).
    Sidecar metadata files beside it fill the fields the header cannot state.

    Raises:
        InvalidArgument: `CORRUPT_WEIGHTS` for a damaged file, `CORRUPT_JSON` for a broken sidecar.
    """
    header = header if header is not None else read_header(path)
    names = header.names()
    if not names:
        return None
    image = (
        _full_checkpoint(header, names)
        or _lora(header, names)
        or _embedding(header, names, path)
        or _vae(names)
    )
    if image is None:
        return None
    image.weight_format = model_pb2.WEIGHT_FORMAT_SAFETENSORS
    image.parameter_count = header.parameter_count
    apply_sidecar(image, read_sidecar(path))
    return image


# --------------------------------------------------------------------------- sidecar metadata


@dataclass
class Sidecar:
    """Metadata image tools keep beside a single-file model (civitai info, A1111 json, previews)."""

    trigger_words: list[str] = field(default_factory=list)
    base_model: BaseModel = model_pb2.IMAGE_BASE_MODEL_UNSPECIFIED
    nsfw: bool | None = None
    previews: list[str] = field(default_factory=list)
    downloads: int | None = None
    likes: int | None = None
    license: str = ""
    tags: list[str] = field(default_factory=list)
    clip_skip: int | None = None
    files: list[str] = field(default_factory=list)


def sidecar_paths(path: Path) -> list[Path]:
    """Metadata files beside `path` that :func:`read_sidecar` reads, in order."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    candidates = [
        path.with_name(path.name + ".civitai.info"),
        path.with_name(stem + ".civitai.info"),
        path.with_name(stem + ".json"),
    ]
    found: list[Path] = []
    roots = model_roots(path.parent)
    for candidate in candidates:
        if not candidate.is_file() or candidate in found:
            continue
        # a sidecar is optional metadata: one that links out of the model's folder is not read
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError):
            continue
        if inside(resolved, roots):
            found.append(candidate)
    return found


def _words(value: Any) -> list[str]:
    words: list[str] = []
    for item in as_str_list(value):
        words.extend(w.strip() for w in item.split(",") if w.strip())
    return words


def _tag_names(value: Any) -> list[str]:
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, str) and item.strip():
                out.append(item.strip())
            elif isinstance(item, dict) and isinstance(item.get("name"), str):
                out.append(item["name"].strip())
        return out
    return []


def read_sidecar(path: Path) -> Sidecar:
    """Read the civitai / A1111 metadata files and preview images beside a single-file model.

    Raises:
        InvalidArgument: `CORRUPT_JSON` for a metadata file that is not valid JSON.
    """
    sidecar = Sidecar()
    for meta_path in sidecar_paths(path):
        data = read_json_object(meta_path, base=path.parent)
        sidecar.files.append(meta_path.name)
        model: dict[str, Any] = data["model"] if isinstance(data.get("model"), dict) else {}
        stats: dict[str, Any] = data["stats"] if isinstance(data.get("stats"), dict) else {}
        words = (
            _words(data.get("trainedWords"))
            or _words(data.get("activation text"))
            or _words(data.get("trigger_words"))
        )
        sidecar.trigger_words = sidecar.trigger_words or unique(words)
        if not sidecar.base_model:
            for value in (data.get("baseModel"), data.get("sd version"), data.get("base_model")):
                if isinstance(value, str) and base_model_from_text(value):
                    sidecar.base_model = base_model_from_text(value)
                    break
        if sidecar.nsfw is None:
            for value in (model.get("nsfw"), data.get("nsfw")):
                if isinstance(value, bool):
                    sidecar.nsfw = value
                    break
        for image in data.get("images") or []:
            if isinstance(image, dict) and isinstance(image.get("url"), str) and image["url"]:
                sidecar.previews.append(image["url"])
        if sidecar.downloads is None:
            sidecar.downloads = as_int(stats.get("downloadCount"))
        if sidecar.likes is None:
            sidecar.likes = as_int(stats.get("thumbsUpCount"))
            if sidecar.likes is None:
                sidecar.likes = as_int(stats.get("favoriteCount"))
        for value in (data.get("license"), model.get("license")):
            if isinstance(value, str) and value and not sidecar.license:
                sidecar.license = value
        sidecar.tags = unique([*sidecar.tags, *_tag_names(model.get("tags")), *_tag_names(data.get("tags"))])
        if sidecar.clip_skip is None:
            sidecar.clip_skip = as_int(data.get("clip_skip") or data.get("clipSkip"))
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    for suffix in PREVIEW_SUFFIXES:
        preview = path.with_name(stem + suffix)
        if preview.is_file():
            sidecar.previews.append(preview.name)
    sidecar.previews = unique(sidecar.previews)
    return sidecar


def apply_sidecar(image: model_pb2.ImageConfig, sidecar: Sidecar) -> None:
    """Fill `image` from sidecar metadata. Facts from the weights win over sidecar claims,
    except trigger words, where the author's declared words replace tag-frequency guesses."""
    if sidecar.trigger_words:
        del image.trigger_words[:]
        image.trigger_words.extend(sidecar.trigger_words)
    if not image.base_model and sidecar.base_model:
        image.base_model = sidecar.base_model
    if sidecar.nsfw is not None and not image.HasField("nsfw"):
        image.nsfw = sidecar.nsfw
    image.previews.extend(p for p in sidecar.previews if p not in image.previews)
    if sidecar.downloads is not None and not image.HasField("downloads"):
        image.downloads = sidecar.downloads
    if sidecar.likes is not None and not image.HasField("likes"):
        image.likes = sidecar.likes
    if sidecar.license and not image.license:
        image.license = sidecar.license
    image.tags.extend(t for t in sidecar.tags if t not in image.tags)
    if sidecar.clip_skip is not None and not image.HasField("clip_skip"):
        image.clip_skip = sidecar.clip_skip
