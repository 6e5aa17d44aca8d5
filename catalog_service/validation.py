"""Validation checks of a model's files, each with an outcome and a message a person can act on.

`validate(path, detection)` checks, per layout:

* transformers folders: config.json and a tokenizer file present, every JSON parses,
  weights present and their headers readable, weights consistent with the config
  (embedding rows = vocab_size, embedding width = hidden size, number of layers), the
  tokenizer fits the vocabulary, the chat template compiles;
* adapters: adapter_config.json and adapter weights present, LoRA shapes match the rank,
  the base model is available locally;
* diffusers folders: model_index.json and every component's folder, config and weights,
  headers readable, UNet consistent with its config, VAE and text encoders;
* GGUF and single files: the header is readable and complete;
* every field detection could not determine: a WARN check naming what to add.

`deep=True` also loads an LLM with transformers (`trust_remote_code=False`, local files
only) and runs one forward pass on a few tokens; other kinds get a SKIP check.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catalog_service.detection import Detection, detect, missing_fields
from catalog_service.detection.common import (
    GGUF_SUFFIX,
    PICKLE_SUFFIXES,
    is_pickle_weights,
    read_json,
    read_json_object,
)
from catalog_service.detection.image import component_folder, component_weight_files, pipeline_components
from catalog_service.detection.llm import TOKENIZER_FILES, has_tokenizer, local_base_folder
from catalog_service.detection.safetensors_header import (
    SafetensorsHeader,
    WeightSet,
    index_shards,
    model_weight_files,
    read_header,
)
from catalog_service.hashing import SKIPPED_DIRS
from catalog_service.paths import named_path
from modelyard.catalog.v1 import catalog_service_pb2, model_pb2, worker_pb2
from server_kit.errors import InvalidArgument, ModelyardError

log = logging.getLogger(__name__)

PASS = worker_pb2.RULE_OUTCOME_PASS
WARN = worker_pb2.RULE_OUTCOME_WARN
FAIL = worker_pb2.RULE_OUTCOME_FAIL
SKIP = worker_pb2.RULE_OUTCOME_SKIP

FIELD_HINTS: dict[str, str] = {
    "architecture": "config.json has no `architectures` list; add the model class (e.g. LlamaForCausalLM)",
    "model_type": "config.json has no `model_type`; add the transformers model type (e.g. llama)",
    "context_length": "config.json states no context length; add `max_position_embeddings` "
    "(or the family's own field)",
    "vocab_size": "config.json has no `vocab_size`",
    "num_layers": "config.json has no layer count (`num_hidden_layers`)",
    "hidden_size": "config.json has no `hidden_size`",
    "num_attention_heads": "config.json has no `num_attention_heads`",
    "dtype": "neither config.json (`dtype`/`torch_dtype`) nor the weight headers state the dtype",
    "parameter_count": "no safetensors/GGUF weights to count parameters from (pickle weights are not read)",
    "weight_format": "no weight files were found",
    "tokenizer.eos_token": "no end-of-sequence token in tokenizer_config.json or special_tokens_map.json; "
    "generation may not stop by itself",
    "tokenizer.chat_template": "no chat template (tokenizer_config.json `chat_template` or "
    "chat_template.jinja): Chat requests need one, plain completions still work",
    "adapter.adapter_type": "adapter_config.json has no `peft_type`",
    "adapter.base_model_name_or_path": "adapter_config.json has no `base_model_name_or_path`; "
    "the base model cannot be found",
    "adapter.rank": "adapter_config.json has no LoRA rank `r`",
    "adapter.alpha": "adapter_config.json has no `lora_alpha`",
    "adapter.target_modules": "adapter_config.json has no `target_modules`",
    "base_model": "the base model family (SD 1.5, SDXL, ...) could not be told from the files; add a "
    "`.civitai.info` or `.json` sidecar with `baseModel`, or set it on the entry",
    "pipeline_class": "the diffusers pipeline class could not be determined",
    "resolution": "the native resolution is not stated by the files (single-file checkpoints do not "
    "record it; the pipeline's default is used)",
    "trigger_words": "no trigger words in the file metadata or a sidecar file; users must know "
    "the words the model was trained on",
    "lora_rank": "the LoRA rank could not be read (no `ss_network_dim` and no lora_down tensors)",
    "lora_alpha": "the LoRA alpha could not be read (no `ss_network_alpha` and no `.alpha` tensors)",
    "samplers": "model_index.json names no scheduler",
    "vae": "model_index.json names no VAE",
    "task": "the audio task could not be determined from the architecture",
    "sample_rate": "no `sampling_rate` in preprocessor_config.json",
    "num_frames": "the number of frames is not stated in the denoiser config",
    "checkpoint_type": "the kind of checkpoint could not be determined",
}

EMBEDDING_SUFFIXES: tuple[str, ...] = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
    "embeddings.weight",
)
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")

MODEL_COMPONENT_LIBRARIES = frozenset({"diffusers", "transformers"})
NON_MODEL_CLASS_MARKERS: tuple[str, ...] = (
    "Tokenizer",
    "Scheduler",
    "FeatureExtractor",
    "ImageProcessor",
    "Processor",
)


@dataclass(frozen=True)
class Check:
    """One validation check: id, outcome (`worker_pb2.RuleOutcome`), message."""

    check: str
    outcome: int
    message: str

    def to_proto(self) -> catalog_service_pb2.ValidationCheck:
        """The `ValidationCheck` message of this check."""
        return catalog_service_pb2.ValidationCheck(
            check=self.check,
            outcome=self.outcome,  # type: ignore[arg-type]
            message=self.message,
        )


def _first_line(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, ModelyardError) else str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _layout_of(path: Path, config: Any) -> str:
    if path.is_file():
        return "gguf" if path.suffix == GGUF_SUFFIX else "single_file"
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "model_index.json").is_file():
        return "diffusers"
    if (path / "config.json").is_file():
        return "transformers"
    return (
        "gguf"
        if isinstance(config, model_pb2.LlmConfig) and config.weight_format == model_pb2.WEIGHT_FORMAT_GGUF
        else "single_file"
    )


def _as_detection(path: Path, detection_or_config: Detection | Any) -> Detection:
    if isinstance(detection_or_config, Detection):
        return detection_or_config
    config = detection_or_config
    kinds = {
        "LlmConfig": model_pb2.MODEL_KIND_LLM,
        "ImageConfig": model_pb2.MODEL_KIND_IMAGE,
        "AudioConfig": model_pb2.MODEL_KIND_AUDIO,
        "VideoConfig": model_pb2.MODEL_KIND_VIDEO,
    }
    layout = _layout_of(path, config)
    return Detection(
        kind=kinds[config.DESCRIPTOR.name],
        config=config,
        weight_format=getattr(config, "weight_format", model_pb2.WEIGHT_FORMAT_UNSPECIFIED),
        layout=layout,
        missing_fields=missing_fields(config, layout),
    )


def validate(
    path: Path | str,
    detection_or_config: Detection | Any | None = None,
    *,
    deep: bool = False,
    allowed_roots: Sequence[Path] | None = None,
) -> list[Check]:
    """Run the checks for the model at `path`; see the module docstring.

    Args:
        path: the model folder or file.
        detection_or_config: the `Detection` of `path`, or a stored typed config
            (`LlmConfig`, `ImageConfig`, ...); detected from `path` when None.
        deep: also load an LLM and run one forward pass (only when no other check failed:
            a model whose files are refused is never loaded).
        allowed_roots: where an adapter's local base model may be read from (None:
            anywhere). Paths named inside the model's files (index shards, diffusers
            components) must stay inside the model's own folder in any case.

    Returns:
        Every check, in order. The model is valid when none is FAIL.
    """
    root = Path(path)
    if not root.exists():
        return [Check("path_exists", FAIL, f"{root} does not exist; import the model again.")]
    if detection_or_config is None:
        try:
            detection = detect(root, allowed_roots=allowed_roots)
        except ModelyardError as exc:
            return [Check("model_detected", FAIL, exc.message)]
    else:
        detection = _as_detection(root, detection_or_config)

    checks: list[Check] = []
    layout = detection.layout or _layout_of(root, detection.config)
    try:
        if layout == "transformers":
            checks += _transformers_checks(root, detection)
        elif layout == "adapter":
            checks += _adapter_checks(root, detection, allowed_roots)
        elif layout == "diffusers":
            checks += _diffusers_checks(root, detection)
        elif layout == "gguf":
            checks += _gguf_checks(root if root.is_file() else _single(root, GGUF_SUFFIX), detection)
        else:
            checks += _single_file_checks(
                root if root.is_file() else _single(root, ".safetensors"), detection
            )
    except ModelyardError as exc:  # a path named in a file leads outside, a FIFO, ...
        checks.append(Check("files_readable", FAIL, exc.message))

    for name in detection.missing_fields:
        hint = FIELD_HINTS.get(name, f"{name} could not be determined from the files")
        checks.append(Check(f"field_{name.replace('.', '_')}", WARN, f"{name} is unknown: {hint}."))

    if deep:
        if any(c.outcome == FAIL for c in checks):
            checks.append(
                Check("forward_pass", SKIP, "not loaded: fix the failed checks first (nothing was loaded).")
            )
        else:
            checks.append(_deep_check(root, detection, layout, allowed_roots))
    return checks


def _single(folder: Path, suffix: str) -> Path:
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == suffix)
    return found[0] if found else folder


# --------------------------------------------------------------------------- shared checks


def _json_check(root: Path) -> Check:
    bad: list[str] = []
    count = 0
    for json_path in sorted(root.rglob("*.json")):
        if any(part in SKIPPED_DIRS for part in json_path.relative_to(root).parts):
            continue
        count += 1
        try:
            read_json(json_path, base=root)
        except InvalidArgument as exc:
            bad.append(exc.message)
    if bad:
        return Check("json_parses", FAIL, " ".join(bad))
    return Check("json_parses", PASS, f"{count} JSON file(s) parse.")


def _headers_check(
    root: Path, files: Sequence[Path], check: str = "weights_readable"
) -> tuple[Check, WeightSet]:
    headers: list[SafetensorsHeader] = []
    problems: list[str] = []
    for file in files:
        try:
            headers.append(read_header(file, base=root))
        except InvalidArgument as exc:
            problems.append(exc.message)
    weights = WeightSet(tuple(headers))
    if problems:
        return Check(check, FAIL, " ".join(problems)), weights
    return (
        Check(
            check,
            PASS,
            f"{len(headers)} safetensors header(s) readable, {weights.parameter_count:,} parameters.",
        ),
        weights,
    )


# --------------------------------------------------------------------------- transformers


def tokenizer_size(folder: Path) -> int | None:
    """Number of token ids tokenizer.json can produce (max id + 1), when it is there."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    data = read_json_object(path, base=folder)
    ids: list[int] = []
    model = data.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        ids.extend(v for v in vocab.values() if isinstance(v, int))
    elif isinstance(vocab, list):
        ids.append(len(vocab) - 1)
    for added in data.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("id"), int):
            ids.append(added["id"])
    return max(ids) + 1 if ids else None


def _embedding(weights: WeightSet) -> tuple[str, tuple[int, ...]] | None:
    for tensor in sorted(weights.tensors(), key=lambda t: t.name):
        if (
            tensor.name.endswith(EMBEDDING_SUFFIXES)
            and len(tensor.shape) == 2
            and "position" not in tensor.name
        ):
            return tensor.name, tensor.shape
    return None


def _consistency_check(llm: model_pb2.LlmConfig, weights: WeightSet) -> Check:
    problems: list[str] = []
    facts: list[str] = []
    embedding = _embedding(weights)
    if embedding is not None:
        name, (rows, width) = embedding
        if llm.HasField("vocab_size"):
            if rows != llm.vocab_size:
                problems.append(
                    f"{name} has {rows} rows but config.json says vocab_size {llm.vocab_size}; "
                    "the weights belong to another model or config.json was edited"
                )
            else:
                facts.append(f"embedding rows = vocab_size {rows}")
        if llm.HasField("hidden_size"):
            if width != llm.hidden_size:
                problems.append(f"{name} is {width} wide but config.json says hidden_size {llm.hidden_size}")
            else:
                facts.append(f"hidden size {width}")
    layers = {int(m.group(1)) for t in weights.tensors() if (m := LAYER_INDEX.search(t.name)) is not None}
    if layers and llm.HasField("num_layers"):
        if len(layers) != llm.num_layers:
            problems.append(
                f"the weights hold {len(layers)} layers but config.json says {llm.num_layers}; "
                "a shard may be missing or config.json is wrong"
            )
        else:
            facts.append(f"{len(layers)} layers")
    if problems:
        return Check("weights_match_config", FAIL, "; ".join(problems) + ".")
    if not facts:
        return Check(
            "weights_match_config",
            SKIP,
            "no embedding or layer tensors recognized to compare with config.json.",
        )
    return Check("weights_match_config", PASS, "weights agree with config.json: " + ", ".join(facts) + ".")


def _index_check(folder: Path, weights: WeightSet) -> Check | None:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        _, weight_map = index_shards(index, base=folder)
    except InvalidArgument as exc:
        return Check("weights_index_consistent", FAIL, exc.message)
    by_file = {h.path.name: h for h in weights.headers}
    missing = [t for t, shard in weight_map.items() if shard in by_file and t not in by_file[shard].tensors]
    if missing:
        return Check(
            "weights_index_consistent",
            FAIL,
            f"{len(missing)} tensor(s) listed in model.safetensors.index.json are not in their shard "
            f"(e.g. {missing[0]}); copy the shards again.",
        )
    return Check(
        "weights_index_consistent", PASS, f"all {len(weight_map)} indexed tensors are in their shards."
    )


NAMED_FILE_SOURCES = ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
"""Files whose `*_file` entries name other files that transformers opens when loading."""


def _named_files_check(folder: Path) -> Check:
    """Every `*_file` a tokenizer/processor config names stays inside the model's folder.

    transformers opens such names as given (`tokenizer_file: /etc/x` would be read by the
    deep check); they are file contents, confined like request paths.
    """
    problems: list[str] = []
    for config_name in NAMED_FILE_SOURCES:
        path = folder / config_name
        if not path.is_file():
            continue
        try:
            data = read_json(path, base=folder)
        except InvalidArgument:
            continue  # reported by json_parses
        if not isinstance(data, dict):
            continue
        for key, value in data.items():
            if not (isinstance(key, str) and key.endswith("_file") and isinstance(value, str) and value):
                continue
            try:
                named_path(folder, value, base=folder)
            except ModelyardError:
                problems.append(f"{config_name} `{key[:60]}` names a file outside the model's folder")
    if problems:
        return Check("named_files_confined", FAIL, "; ".join(problems) + "; name files inside the folder.")
    return Check("named_files_confined", PASS, "files named by the configs lie inside the model's folder.")


def _chat_template_check(template: str) -> Check:
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # pragma: no cover - depends on the transformers version
        return Check("chat_template_compiles", SKIP, "transformers' template compiler is not available.")
    try:
        _compile_jinja_template(template)
    except Exception as exc:  # jinja2.TemplateSyntaxError, ImportError for missing jinja2 ...
        return Check(
            "chat_template_compiles",
            FAIL,
            f"the chat template does not compile: {_first_line(exc)}; fix the template.",
        )
    return Check("chat_template_compiles", PASS, "the chat template compiles.")


def _transformers_checks(folder: Path, detection: Detection) -> list[Check]:
    checks = [Check("config_json_present", PASS, "config.json is present.")]
    llm = detection.config if isinstance(detection.config, model_pb2.LlmConfig) else None
    if llm is not None:
        if has_tokenizer(folder):
            checks.append(Check("tokenizer_present", PASS, "a tokenizer file is present."))
        else:
            checks.append(
                Check(
                    "tokenizer_present",
                    FAIL,
                    f"no tokenizer file ({', '.join(TOKENIZER_FILES[:4])}, ...) in the folder; copy the "
                    "model's tokenizer files next to config.json.",
                )
            )
    checks.append(_json_check(folder))
    checks.append(_named_files_check(folder))
    files = model_weight_files(folder)
    pickles = sorted(p.name for p in folder.iterdir() if is_pickle_weights(p.name))
    if not files and not pickles:
        checks.append(
            Check(
                "weights_present",
                FAIL,
                "no weight files (model.safetensors or shards) in the folder; copy them.",
            )
        )
        return checks
    if not files:
        checks.append(
            Check(
                "weights_present",
                WARN,
                f"only pickle weights ({', '.join(pickles[:3])}); their headers cannot be checked safely. "
                "Convert them to safetensors.",
            )
        )
        return checks
    checks.append(Check("weights_present", PASS, f"{len(files)} safetensors file(s)."))
    readable, weights = _headers_check(folder, files)
    checks.append(readable)
    if readable.outcome == FAIL:
        return checks
    index = _index_check(folder, weights)
    if index is not None:
        checks.append(index)
    if llm is None:
        return checks
    checks.append(_consistency_check(llm, weights))
    header_dtype = weights.dtype
    if llm.dtype and header_dtype and llm.dtype != header_dtype and not llm.HasField("quantization"):
        checks.append(
            Check(
                "dtype_matches_weights",
                WARN,
                f"config.json says {llm.dtype} but most weights are stored as {header_dtype}; "
                "engines load the stored dtype unless told otherwise.",
            )
        )
    size = tokenizer_size(folder)
    if size is not None and llm.HasField("vocab_size"):
        if size > llm.vocab_size:
            checks.append(
                Check(
                    "tokenizer_fits_vocab",
                    FAIL,
                    f"the tokenizer produces ids up to {size - 1} but the model has only {llm.vocab_size} "
                    "embedding rows; use the tokenizer that belongs to these weights.",
                )
            )
        else:
            checks.append(
                Check(
                    "tokenizer_fits_vocab", PASS, f"tokenizer ids (< {size}) fit vocab_size {llm.vocab_size}."
                )
            )
    if llm.tokenizer.HasField("chat_template"):
        checks.append(_chat_template_check(llm.tokenizer.chat_template))
    if llm.requires_remote_code:
        checks.append(
            Check(
                "no_remote_code",
                WARN,
                "config.json has `auto_map`: loading needs trust_remote_code, which is off unless a "
                "request opts in and the server allows it.",
            )
        )
    return checks


# --------------------------------------------------------------------------- adapters


def _adapter_checks(folder: Path, detection: Detection, allowed_roots: Sequence[Path] | None) -> list[Check]:
    checks = [
        Check("adapter_config_present", PASS, "adapter_config.json is present."),
        _json_check(folder),
        _named_files_check(folder),
    ]
    files = model_weight_files(folder, "adapter_model")
    if not files:
        pickled = [f"adapter_model{s}" for s in PICKLE_SUFFIXES if (folder / f"adapter_model{s}").is_file()]
        if pickled:
            checks.append(
                Check("adapter_weights_present", WARN, f"only pickle adapter weights ({pickled[0]}).")
            )
        else:
            checks.append(
                Check(
                    "adapter_weights_present",
                    FAIL,
                    "no adapter_model.safetensors next to adapter_config.json; copy the adapter weights.",
                )
            )
        return checks
    checks.append(Check("adapter_weights_present", PASS, f"{files[0].name} is present."))
    readable, weights = _headers_check(folder, files)
    checks.append(readable)
    llm = detection.config if isinstance(detection.config, model_pb2.LlmConfig) else model_pb2.LlmConfig()
    adapter = llm.adapter
    if readable.outcome != FAIL and adapter.HasField("rank"):
        adapter_config = read_json_object(folder / "adapter_config.json", base=folder)
        if adapter_config.get("rank_pattern"):
            checks.append(
                Check("adapter_rank_matches", SKIP, "per-module ranks (`rank_pattern`) are in use.")
            )
        else:
            wrong = [
                t.name
                for t in weights.tensors()
                if t.name.endswith("lora_A.weight") and t.shape and t.shape[0] != adapter.rank
            ]
            if wrong:
                checks.append(
                    Check(
                        "adapter_rank_matches",
                        FAIL,
                        f"{len(wrong)} lora_A tensor(s) (e.g. {wrong[0]}) do not have rank r={adapter.rank} "
                        "from adapter_config.json; the config and weights do not belong together.",
                    )
                )
            else:
                checks.append(Check("adapter_rank_matches", PASS, f"LoRA tensors have rank {adapter.rank}."))
    base = local_base_folder(folder, adapter.base_model_name_or_path, allowed_roots)
    if base is not None:
        checks.append(Check("base_model_available", PASS, f"the base model is a local folder ({base.name})."))
    elif adapter.base_model_name_or_path:
        checks.append(
            Check(
                "base_model_available",
                WARN,
                f"the base model {adapter.base_model_name_or_path!r} is not a local folder the catalog "
                "may read; import it into the catalog (or the HF cache) so the adapter can be linked "
                "and served.",
            )
        )
    return checks


# --------------------------------------------------------------------------- diffusers


def _is_model_component(library: str, cls: str) -> bool:
    return library in MODEL_COMPONENT_LIBRARIES and not any(m in cls for m in NON_MODEL_CLASS_MARKERS)


def _diffusers_checks(folder: Path, detection: Detection) -> list[Check]:
    checks = [Check("model_index_present", PASS, "model_index.json is present.")]
    json_check = _json_check(folder)
    checks.append(json_check)
    if json_check.outcome == FAIL:
        return checks
    components = pipeline_components(read_json_object(folder / "model_index.json", base=folder))
    problems: list[str] = []
    weight_files: list[Path] = []
    for name, (library, cls) in sorted(components.items()):
        component = component_folder(folder, name)
        if not component.is_dir():
            problems.append(f"{name}/ ({cls}) is missing")
            continue
        if _is_model_component(library, cls):
            if not (component / "config.json").is_file():
                problems.append(f"{name}/config.json is missing")
            files = component_weight_files(component)
            if not files and not any(is_pickle_weights(p.name) for p in component.iterdir()):
                problems.append(f"{name}/ has no weights")
            weight_files.extend(files)
        elif "Scheduler" in cls and not (component / "scheduler_config.json").is_file():
            problems.append(f"{name}/scheduler_config.json is missing")
        elif "Tokenizer" in cls and not (
            has_tokenizer(component) or (component / "tokenizer_config.json").is_file()
        ):
            problems.append(f"{name}/ has no tokenizer files")
    if problems:
        checks.append(
            Check(
                "components_present",
                FAIL,
                "model_index.json names components that are incomplete: " + "; ".join(problems) + ".",
            )
        )
    else:
        checks.append(Check("components_present", PASS, f"all {len(components)} components are present."))
    readable, weights = _headers_check(folder, weight_files)
    checks.append(readable)
    if readable.outcome != FAIL and "unet" in components:
        checks.append(_unet_check(folder, components, weights))
    return checks


def _unet_check(folder: Path, components: dict[str, tuple[str, str]], weights: WeightSet) -> Check:
    problems: list[str] = []
    unet = _read_optional(folder / "unet" / "config.json", folder)
    vae = _read_optional(folder / "vae" / "config.json", folder)
    if unet is None:
        return Check("components_consistent", SKIP, "unet/config.json could not be read.")
    conv_in = next((h.get("conv_in.weight") for h in weights.headers if h.path.parent.name == "unet"), None)
    in_channels = unet.get("in_channels")
    if (
        conv_in is not None
        and len(conv_in.shape) == 4
        and in_channels is not None
        and conv_in.shape[1] != in_channels
    ):
        problems.append(
            f"unet conv_in takes {conv_in.shape[1]} channels but unet/config.json says {in_channels}"
        )
    latent = vae.get("latent_channels") if vae is not None else None
    out_channels = unet.get("out_channels")
    if isinstance(latent, int) and isinstance(out_channels, int) and latent != out_channels:
        problems.append(f"the VAE has {latent} latent channels but the UNet outputs {out_channels}")
    cross = unet.get("cross_attention_dim")
    widths = []
    for name in ("text_encoder", "text_encoder_2"):
        if name in components:
            config = _read_optional(component_folder(folder, name) / "config.json", folder)
            width = config.get("hidden_size") if config is not None else None
            if isinstance(width, int):
                widths.append(width)
    if isinstance(cross, int) and widths and cross not in (sum(widths), widths[-1]):
        problems.append(f"unet cross_attention_dim {cross} does not match the text encoder width(s) {widths}")
    if problems:
        return Check("components_consistent", FAIL, "; ".join(problems) + ".")
    return Check("components_consistent", PASS, "UNet, VAE and text encoders agree on their shapes.")


def _read_optional(path: Path, base: Path) -> dict[str, Any] | None:
    try:
        return read_json_object(path, base=base) if path.is_file() else None
    except InvalidArgument:
        return None


# --------------------------------------------------------------------------- single files


def _gguf_checks(path: Path, detection: Detection) -> list[Check]:
    from catalog_service.detection.gguf import open_reader

    if not path.is_file():
        return [Check("weights_present", FAIL, "no .gguf file found.")]
    try:
        reader = open_reader(path)
    except InvalidArgument as exc:
        return [Check("weights_readable", FAIL, exc.message)]
    size = path.stat().st_size
    beyond = [t.name for t in reader.tensors if int(t.data_offset) + int(t.n_bytes) > size]
    checks = []
    if beyond:
        checks.append(
            Check(
                "weights_readable",
                FAIL,
                f"{len(beyond)} tensor(s) end past the end of {path.name}; copy it again.",
            )
        )
    else:
        checks.append(
            Check("weights_readable", PASS, f"GGUF header and {len(reader.tensors)} tensors readable.")
        )
    if "tokenizer.ggml.tokens" in reader.fields:
        checks.append(Check("tokenizer_present", PASS, "the GGUF file embeds its tokenizer."))
    else:
        checks.append(
            Check(
                "tokenizer_present",
                WARN,
                "the GGUF file has no tokenizer (tokenizer.ggml.tokens); engines need one.",
            )
        )
    return checks


def _single_file_checks(path: Path, detection: Detection) -> list[Check]:
    if not path.is_file():
        return [Check("weights_present", FAIL, "no weights file found.")]
    readable, _ = _headers_check(path.parent, [path])
    checks = [readable]
    config = detection.config
    if isinstance(config, model_pb2.ImageConfig):
        if config.checkpoint_type:
            name = (
                model_pb2.CheckpointType.Name(config.checkpoint_type).removeprefix("CHECKPOINT_TYPE_").lower()
            )
            checks.append(Check("checkpoint_type_detected", PASS, f"the file is an image {name}."))
        else:
            checks.append(
                Check("checkpoint_type_detected", FAIL, "the kind of image checkpoint could not be told.")
            )
    elif isinstance(config, model_pb2.LlmConfig):
        checks.append(
            Check(
                "config_json_present",
                WARN,
                "a bare LLM weights file: engines need config.json and the tokenizer; import the whole model "
                "folder instead when you can.",
            )
        )
    return checks


# --------------------------------------------------------------------------- deep check


def _deep_check(
    root: Path, detection: Detection, layout: str, allowed_roots: Sequence[Path] | None = None
) -> Check:
    if detection.kind != model_pb2.MODEL_KIND_LLM or layout == "single_file":
        return Check(
            "forward_pass",
            SKIP,
            "the deep check loads LLM folders and GGUF files only; this model is checked by its headers.",
        )
    config = detection.config
    assert isinstance(config, model_pb2.LlmConfig)
    if config.requires_remote_code:
        return Check(
            "forward_pass", SKIP, "the model needs trust_remote_code; the deep check never runs remote code."
        )
    try:
        return _forward_pass(root, config, layout, allowed_roots)
    except Exception as exc:  # any load or runtime error is the check's answer
        log.info("deep check of %s failed", root, exc_info=True)
        return Check(
            "forward_pass",
            FAIL,
            f"loading or running the model failed: {type(exc).__name__}: {_first_line(exc)}",
        )


def _forward_pass(
    root: Path, config: model_pb2.LlmConfig, layout: str, allowed_roots: Sequence[Path] | None
) -> Check:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options: dict[str, Any] = {"trust_remote_code": False, "local_files_only": True}
    if layout == "gguf":
        gguf_file = root if root.is_file() else _single(root, GGUF_SUFFIX)
        folder, options["gguf_file"] = gguf_file.parent, gguf_file.name
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **options)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **options)
    elif layout == "adapter":
        from peft import PeftModel

        base = local_base_folder(root, config.adapter.base_model_name_or_path, allowed_roots)
        if base is None:
            return Check(
                "forward_pass", SKIP, "the adapter's base model is not a local folder; import it first."
            )
        tokenizer_folder = root if has_tokenizer(root) else base
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder), **options)
        base_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, **options)
        model = PeftModel.from_pretrained(base_model, str(root), local_files_only=True)  # type: ignore[assignment]
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(root), **options)
        model = AutoModelForCausalLM.from_pretrained(str(root), dtype=torch.float32, **options)
    model.eval()
    ids = tokenizer("Hello, world", return_tensors="pt")["input_ids"][:, :8]
    if ids.shape[1] == 0:
        ids = torch.tensor([[0]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        return Check(
            "forward_pass", FAIL, "the forward pass produced NaN or infinite logits; the weights are damaged."
        )
    parameters = sum(p.numel() for p in model.parameters())
    return Check(
        "forward_pass",
        PASS,
        f"loaded {type(model).__name__} ({parameters:,} parameters, trust_remote_code off) and ran a "
        f"forward pass on {ids.shape[1]} tokens: logits {tuple(logits.shape)} are finite.",
    )


__all__ = ["FAIL", "PASS", "SKIP", "WARN", "Check", "validate"]
