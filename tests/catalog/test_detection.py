"""Detection of real tiny models: kind and typed config come from the files, never guessed.

Every model here is built on the spot by `tinymodels` (random weights, real architectures);
expected values are the ones the builders chose, and parameter counts are compared with
what torch counts on the loaded model itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest

from catalog_service import sources
from catalog_service.detection import Detection, compatible_model_types, detect, recommended_model_type
from catalog_service.detection.safetensors_header import read_header
from modelyard.catalog.v1 import model_pb2
from server_kit.errors import InvalidArgument, NotFound
from tinymodels.tokenizer import CHAT_TEMPLATE, MODEL_MAX_LENGTH

if TYPE_CHECKING:
    from tinymodels.diffusion import Base
    from tinymodels.llm import Arch

TEMPLATE_SHA = hashlib.sha256(CHAT_TEMPLATE.encode("utf-8")).hexdigest()

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "mistral": "MistralForCausalLM",
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of tiny models, built once for the module."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def llm_dirs(models: Path) -> dict[str, Path]:
    from tinymodels.llm import build_llm

    return {arch: build_llm(models / arch, cast("Arch", arch)) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def pipelines(models: Path) -> dict[str, Path]:
    from tinymodels.diffusion import build_sd15_pipeline, build_sdxl_pipeline

    return {
        "sd15": build_sd15_pipeline(models / "sd15"),
        "sdxl": build_sdxl_pipeline(models / "sdxl"),
    }


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return dst


def _edit_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _llm(path: Path) -> model_pb2.LlmConfig:
    config = detect(path).config
    assert isinstance(config, model_pb2.LlmConfig)
    return config


def _image(path: Path) -> model_pb2.ImageConfig:
    config = detect(path).config
    assert isinstance(config, model_pb2.ImageConfig)
    return config


def _torch_parameter_count(folder: Path) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    return sum(p.numel() for p in model.parameters())


def _file_parameter_count(path: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(path)).values())


def _save_tensors(
    path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None
) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({name: torch.zeros(shape) for name, shape in shapes.items()}, str(path), metadata=metadata)
    return path


# --------------------------------------------------------------------------- LLM folders


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_llm_folder_config_is_read_from_the_files(arch: str, llm_dirs: dict[str, Path]) -> None:
    folder = llm_dirs[arch]
    detection = detect(folder)
    llm = detection.config

    assert detection.kind == model_pb2.MODEL_KIND_LLM
    assert isinstance(llm, model_pb2.LlmConfig)
    assert detection.layout == "transformers"
    assert llm.architecture == ARCHITECTURES[arch]
    assert llm.model_type == arch
    assert arch in llm.compatible_model_types
    assert llm.context_length == MODEL_MAX_LENGTH == 256
    assert llm.vocab_size == json.loads((folder / "config.json").read_text())["vocab_size"]
    assert (llm.num_layers, llm.hidden_size, llm.num_attention_heads) == (2, 64, 2)
    if arch == "gpt2":
        assert not llm.HasField("num_key_value_heads")  # GPT-2's config states no KV heads
    else:
        assert llm.num_key_value_heads == 1
    assert llm.dtype == "float32"
    assert llm.weight_format == model_pb2.WEIGHT_FORMAT_SAFETENSORS
    assert llm.parameter_count == _torch_parameter_count(folder)
    assert llm.default_temperature == pytest.approx(0.7)
    assert llm.default_top_p == pytest.approx(0.9)
    tokenizer = llm.tokenizer
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.chat_template_sha256 == TEMPLATE_SHA
    assert not llm.HasField("quantization")
    assert not llm.HasField("rope_scaling")
    assert not llm.requires_remote_code
    assert detection.missing_fields == []


def test_transformers_configs_are_real_pretrained_configs(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    from transformers import GPT2Config, PretrainedConfig

    from catalog_service.detection.llm import load_pretrained_config

    config = load_pretrained_config(llm_dirs["gpt2"])
    assert isinstance(config, PretrainedConfig) and isinstance(config, GPT2Config)
    folder = _copy(llm_dirs["gpt2"], tmp_path / "unknown-type")
    _edit_json(folder / "config.json", lambda c: c.update(model_type="tinyfoo"))
    assert load_pretrained_config(folder) is None  # unknown to transformers: the raw JSON is used


def test_compatible_model_types_share_the_config_class() -> None:
    from transformers import CONFIG_MAPPING

    assert compatible_model_types("gpt2") == ["gpt-sw3", "gpt2"]
    assert CONFIG_MAPPING["gpt-sw3"] is CONFIG_MAPPING["gpt2"]
    assert "mistral" in compatible_model_types("mistral")
    assert compatible_model_types("no-such-type") == []
    assert recommended_model_type("llama") == "llama"
    assert recommended_model_type("no-such-type") == ""


def test_chat_template_from_a_separate_jinja_file(models: Path) -> None:
    from tinymodels.llm import build_llm

    folder = build_llm(models / "jinja-template", "llama", separate_chat_template_file=True)
    assert (folder / "chat_template.jinja").is_file()

    tokenizer = _llm(folder).tokenizer
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.chat_template_sha256 == TEMPLATE_SHA


def test_config_fields_families_spell_differently(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(llm_dirs["llama"], tmp_path / "edited")

    def change(config: dict[str, Any]) -> None:
        config["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}

    _edit_json(folder / "config.json", change)
    _edit_json(
        folder / "tokenizer_config.json",
        lambda t: t.update(eos_token={"__type": "AddedToken", "content": "<|im_end|>", "special": True}),
    )
    llm = detect(folder).config
    assert isinstance(llm, model_pb2.LlmConfig)
    assert (llm.rope_scaling.type, llm.rope_scaling.factor) == ("linear", 4.0)
    assert (llm.quantization.method, llm.quantization.bits) == ("gptq", 4)
    assert llm.requires_remote_code
    assert llm.tokenizer.eos_token == "<|im_end|>"


def test_unknown_model_type_keeps_what_the_json_says(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(llm_dirs["llama"], tmp_path / "unknown")

    def change(config: dict[str, Any]) -> None:
        config.update(model_type="tinyfoo", architectures=["TinyFooForCausalLM"])
        del config["max_position_embeddings"]
        config["seq_length"] = 128  # ChatGLM-style context length key

    _edit_json(folder / "config.json", change)
    detection = detect(folder)
    llm = detection.config
    assert isinstance(llm, model_pb2.LlmConfig)
    assert (llm.architecture, llm.model_type) == ("TinyFooForCausalLM", "tinyfoo")
    assert list(llm.compatible_model_types) == []
    assert llm.context_length == 128
    assert llm.hidden_size == 64
    assert "context_length" not in detection.missing_fields


def test_missing_context_length_is_reported_not_defaulted(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(llm_dirs["llama"], tmp_path / "no-context")
    _edit_json(folder / "config.json", lambda c: c.pop("max_position_embeddings"))

    detection = detect(folder)

    # LlamaConfig defaults max_position_embeddings to 2048; that is not a fact of this model
    assert isinstance(detection.config, model_pb2.LlmConfig)
    assert not detection.config.HasField("context_length")
    assert "context_length" in detection.missing_fields


def test_sharded_weights_are_summed_over_the_index(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llm_dirs["qwen2"]), dtype=torch.float32)
    folder = _copy(llm_dirs["qwen2"], tmp_path / "sharded")
    (folder / "model.safetensors").unlink()
    model.save_pretrained(str(folder), max_shard_size="150KB")
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()

    assert _llm(folder).parameter_count == sum(p.numel() for p in model.parameters())


def test_model_card_front_matter(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(llm_dirs["llama"], tmp_path / "carded")
    (folder / "README.md").write_text(
        "---\nlicense: apache-2.0\nlanguage:\n- en\n- fr\ntags:\n- tiny\n- chat\n"
        "author: Tiny Org\n---\n# Tiny\n",
        encoding="utf-8",
    )
    detection = detect(folder)
    assert detection.license == "apache-2.0"
    assert detection.tags == ["tiny", "chat"]
    assert detection.languages == ["en", "fr"]
    assert detection.author == "Tiny Org"
    assert list(_llm(folder).languages) == ["en", "fr"]


def test_single_llm_safetensors_file_gives_parameter_count_only(
    llm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    file = _copy(llm_dirs["mistral"] / "model.safetensors", tmp_path / "weights.safetensors")
    detection = detect(file)
    llm = detection.config
    assert detection.kind == model_pb2.MODEL_KIND_LLM
    assert isinstance(llm, model_pb2.LlmConfig)
    assert llm.parameter_count == _torch_parameter_count(llm_dirs["mistral"])
    assert llm.dtype == "float32"
    assert not llm.architecture
    assert {"architecture", "model_type", "context_length"} <= set(detection.missing_fields)


def test_audio_architecture_gives_an_audio_config(tmp_path: Path) -> None:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=64,
        num_mel_bins=8,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        max_source_positions=8,
        max_target_positions=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    model = WhisperForConditionalGeneration(config)
    model.save_pretrained(str(tmp_path / "whisper"))
    (tmp_path / "whisper" / "preprocessor_config.json").write_text(
        '{"sampling_rate": 16000}', encoding="utf-8"
    )

    detection = detect(tmp_path / "whisper")
    audio = detection.config
    assert detection.kind == model_pb2.MODEL_KIND_AUDIO
    assert isinstance(audio, model_pb2.AudioConfig)
    assert (audio.architecture, audio.model_type) == ("WhisperForConditionalGeneration", "whisper")
    assert audio.task == "automatic-speech-recognition"
    assert audio.sample_rate == 16000
    assert audio.parameter_count == _file_parameter_count(tmp_path / "whisper" / "model.safetensors")


# --------------------------------------------------------------------------- adapters


def test_lora_adapter(llm_dirs: dict[str, Path], models: Path) -> None:
    from tinymodels.llm import build_lora_adapter

    folder = build_lora_adapter(llm_dirs["llama"], models / "llama-lora", r=8, alpha=16)
    detection = detect(folder)
    llm = detection.config
    assert detection.kind == model_pb2.MODEL_KIND_LLM
    assert isinstance(llm, model_pb2.LlmConfig)
    adapter = llm.adapter
    assert adapter.adapter_type == "LORA"
    assert adapter.base_model_name_or_path == str(llm_dirs["llama"])
    assert (adapter.rank, adapter.alpha) == (8, 16.0)
    assert list(adapter.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert (llm.architecture, llm.model_type) == ("LlamaForCausalLM", "llama")
    assert llm.parameter_count == _file_parameter_count(folder / "adapter_model.safetensors")
    assert llm.weight_format == model_pb2.WEIGHT_FORMAT_SAFETENSORS
    assert detection.missing_fields == []


def test_adapter_of_a_hub_base_leaves_the_architecture_unset(llm_dirs: dict[str, Path], models: Path) -> None:
    from tinymodels.llm import build_lora_adapter

    folder = build_lora_adapter(llm_dirs["qwen2"], models / "hub-lora", base_model_name="tiny-org/tiny-qwen2")
    detection = detect(folder)
    llm = detection.config
    assert isinstance(llm, model_pb2.LlmConfig)
    assert llm.adapter.base_model_name_or_path == "tiny-org/tiny-qwen2"
    assert llm.architecture == "" and llm.model_type == ""
    assert {"architecture", "model_type"} <= set(detection.missing_fields)


def test_adapter_base_outside_the_allowed_roots_is_not_read(llm_dirs: dict[str, Path], models: Path) -> None:
    from tinymodels.llm import build_lora_adapter

    folder = build_lora_adapter(llm_dirs["llama"], models / "confined-lora")
    llm = detect(folder, allowed_roots=[folder]).config
    assert isinstance(llm, model_pb2.LlmConfig)
    assert llm.architecture == ""


# --------------------------------------------------------------------------- GGUF


def test_gguf_header(llm_dirs: dict[str, Path], models: Path) -> None:
    from tinymodels.gguf_file import build_gguf

    path = build_gguf(models / "gguf" / "tiny-llama.gguf", source_dir=llm_dirs["llama"])
    detection = detect(path)
    llm = detection.config
    assert detection.kind == model_pb2.MODEL_KIND_LLM
    assert isinstance(llm, model_pb2.LlmConfig)
    assert detection.layout == "gguf"
    assert (llm.architecture, llm.model_type) == ("LlamaForCausalLM", "llama")
    assert "llama" in llm.compatible_model_types
    assert llm.context_length == 256
    assert (llm.hidden_size, llm.num_layers, llm.num_attention_heads, llm.num_key_value_heads) == (
        64,
        2,
        2,
        1,
    )
    assert llm.weight_format == model_pb2.WEIGHT_FORMAT_GGUF
    assert llm.dtype == "float16"
    assert not llm.HasField("quantization")
    assert llm.parameter_count == _torch_parameter_count(llm_dirs["llama"])
    assert (llm.tokenizer.bos_token, llm.tokenizer.eos_token) == ("<s>", "</s>")
    assert llm.tokenizer.chat_template_sha256 == TEMPLATE_SHA
    assert detection.name == "tiny-llama"
    assert detection.missing_fields == []
    # a folder holding just that file is detected the same way
    assert detect(path.parent).config == llm


def test_gguf_quantization_from_the_file_type(models: Path) -> None:
    import gguf

    from tinymodels.gguf_file import build_gguf

    path = build_gguf(
        models / "q.gguf", tensor_type="q8_0", file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M, chat_template=None
    )
    detection = detect(path)
    llm = detection.config
    assert isinstance(llm, model_pb2.LlmConfig)
    assert (llm.quantization.method, llm.quantization.type, llm.quantization.bits) == (
        "gguf",
        "MOSTLY_Q4_K_M",
        4,
    )
    assert llm.dtype == "q4_k_m"
    assert not llm.tokenizer.HasField("chat_template")
    assert detection.missing_fields == ["tokenizer.chat_template"]


# --------------------------------------------------------------------------- HF cache


def test_hf_cache_snapshot_is_detected(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    from tinymodels.hf_cache import build_hf_cache

    cache = tmp_path / "hub"
    snapshot = build_hf_cache(cache, "tiny-org/tiny-gpt2", src_dir=llm_dirs["gpt2"])
    assert (snapshot / "config.json").is_symlink()

    resolved = sources.resolve("tiny-org/tiny-gpt2", allowed_roots=[tmp_path / "elsewhere"], cache_dir=cache)
    assert resolved.path == snapshot.resolve()
    llm = detect(resolved.path).config
    assert isinstance(llm, model_pb2.LlmConfig)
    assert (llm.architecture, llm.model_type, llm.context_length) == ("GPT2LMHeadModel", "gpt2", 256)
    assert llm.parameter_count == _torch_parameter_count(llm_dirs["gpt2"])


# --------------------------------------------------------------------------- image folders


def _pipeline_parameter_count(folder: Path) -> int:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    modules = [
        getattr(pipe, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, n, None)
    ]
    return sum(p.numel() for module in modules for p in module.parameters())


@pytest.mark.parametrize(
    ("name", "base", "pipeline"),
    [
        ("sd15", model_pb2.IMAGE_BASE_MODEL_SD_1_5, "StableDiffusionPipeline"),
        ("sdxl", model_pb2.IMAGE_BASE_MODEL_SDXL, "StableDiffusionXLPipeline"),
    ],
)
def test_diffusers_folder(name: str, base: int, pipeline: str, pipelines: dict[str, Path]) -> None:
    from tinymodels.diffusion import IMAGE_SIZE

    detection = detect(pipelines[name])
    image = detection.config
    assert detection.kind == model_pb2.MODEL_KIND_IMAGE
    assert isinstance(image, model_pb2.ImageConfig)
    assert image.base_model == base
    assert image.checkpoint_type == model_pb2.CHECKPOINT_TYPE_CHECKPOINT
    assert image.pipeline_class == pipeline
    assert image.resolution == IMAGE_SIZE == 64  # unet sample_size 8 x VAE scale factor 8
    assert list(image.samplers) == ["EulerDiscreteScheduler"]
    assert image.vae == "AutoencoderKL"
    assert not image.inpainting
    assert image.weight_format == model_pb2.WEIGHT_FORMAT_SAFETENSORS
    assert image.parameter_count == _pipeline_parameter_count(pipelines[name])
    assert detection.missing_fields == []


def test_pipeline_variants_from_model_index(pipelines: dict[str, Path], tmp_path: Path) -> None:
    refiner = _copy(pipelines["sdxl"], tmp_path / "refiner")
    _edit_json(
        refiner / "model_index.json",
        lambda m: m.update(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None]),
    )
    assert _image(refiner).base_model == model_pb2.IMAGE_BASE_MODEL_SDXL_REFINER

    inpaint = _copy(pipelines["sd15"], tmp_path / "inpaint")
    _edit_json(inpaint / "model_index.json", lambda m: m.update(_class_name="StableDiffusionInpaintPipeline"))
    assert _image(inpaint).inpainting

    v_prediction = _copy(pipelines["sd15"], tmp_path / "sd2")
    _edit_json(
        v_prediction / "scheduler" / "scheduler_config.json",
        lambda s: s.update(prediction_type="v_prediction"),
    )
    assert _image(v_prediction).base_model == model_pb2.IMAGE_BASE_MODEL_SD_2_1


def test_video_pipeline_gives_a_video_config(pipelines: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(pipelines["sd15"], tmp_path / "video")
    _edit_json(folder / "model_index.json", lambda m: m.update(_class_name="AnimateDiffPipeline"))
    detection = detect(folder)
    video = detection.config
    assert detection.kind == model_pb2.MODEL_KIND_VIDEO
    assert isinstance(video, model_pb2.VideoConfig)
    assert video.pipeline_class == "AnimateDiffPipeline"
    assert video.parameter_count == _pipeline_parameter_count(pipelines["sd15"])


def test_detection_applies_to_a_model_entry(pipelines: dict[str, Path]) -> None:
    detection = detect(pipelines["sdxl"])
    model = model_pb2.Model(license="mit")
    detection.apply_to(model)
    assert model.kind == model_pb2.MODEL_KIND_IMAGE
    assert model.WhichOneof("config") == detection.config_field == "image"
    assert model.image == detection.config
    assert model.license == "mit"  # what the entry already says is kept


# --------------------------------------------------------------------------- image single files


@pytest.mark.parametrize(
    ("base", "expected", "pipeline"),
    [
        ("sd15", model_pb2.IMAGE_BASE_MODEL_SD_1_5, "StableDiffusionPipeline"),
        ("sdxl", model_pb2.IMAGE_BASE_MODEL_SDXL, "StableDiffusionXLPipeline"),
    ],
)
def test_single_file_checkpoint(
    base: Base, expected: int, pipeline: str, pipelines: dict[str, Path], models: Path
) -> None:
    from tinymodels.diffusion import build_sd_single_file

    path = build_sd_single_file(models / f"{base}-single.safetensors", base, pipeline_dir=pipelines[base])
    detection = detect(path)
    image = detection.config
    assert detection.kind == model_pb2.MODEL_KIND_IMAGE
    assert isinstance(image, model_pb2.ImageConfig)
    assert image.base_model == expected
    assert image.checkpoint_type == model_pb2.CHECKPOINT_TYPE_CHECKPOINT
    assert image.pipeline_class == pipeline
    assert image.vae == "AutoencoderKL"
    assert not image.inpainting
    assert image.parameter_count == _file_parameter_count(path) == _pipeline_parameter_count(pipelines[base])
    assert detection.missing_fields == ["resolution"]  # a single file does not record it


@pytest.mark.parametrize(
    ("keys", "expected", "inpainting"),
    [
        (  # SD 2.x: OpenCLIP text encoder under cond_stage_model.model
            {
                "model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3),
                "cond_stage_model.model.token_embedding.weight": (8, 4),
            },
            model_pb2.IMAGE_BASE_MODEL_SD_2_1,
            False,
        ),
        (  # SDXL refiner: only OpenCLIP bigG, as embedders.0.model
            {
                "model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3),
                "conditioner.embedders.0.model.text_projection": (4, 4),
            },
            model_pb2.IMAGE_BASE_MODEL_SDXL_REFINER,
            False,
        ),
        (  # SD 1.5 inpainting: the first convolution takes 9 channels
            {
                "model.diffusion_model.input_blocks.0.0.weight": (4, 9, 3, 3),
                "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (8, 4),
            },
            model_pb2.IMAGE_BASE_MODEL_SD_1_5,
            True,
        ),
    ],
    ids=["sd2", "sdxl-refiner", "sd15-inpainting"],
)
def test_single_file_key_patterns(
    keys: dict[str, tuple[int, ...]], expected: int, inpainting: bool, tmp_path: Path
) -> None:
    image = detect(_save_tensors(tmp_path / "ckpt.safetensors", keys)).config
    assert isinstance(image, model_pb2.ImageConfig)
    assert image.base_model == expected
    assert image.inpainting is inpainting
    if inpainting:
        assert image.pipeline_class == "StableDiffusionInpaintPipeline"


@pytest.mark.parametrize(
    ("base", "expected"),
    [("sd15", model_pb2.IMAGE_BASE_MODEL_SD_1_5), ("sdxl", model_pb2.IMAGE_BASE_MODEL_SDXL)],
)
def test_kohya_lora(base: Base, expected: int, pipelines: dict[str, Path], models: Path) -> None:
    from tinymodels.diffusion import build_kohya_lora

    path = build_kohya_lora(
        models / f"{base}-lora.safetensors", base, rank=4, alpha=2.0, pipeline_dir=pipelines[base]
    )
    detection = detect(path)
    image = detection.config
    assert isinstance(image, model_pb2.ImageConfig)
    assert image.checkpoint_type == model_pb2.CHECKPOINT_TYPE_LORA
    assert image.base_model == expected
    assert (image.lora_rank, image.lora_alpha) == (4, 2.0)
    assert list(image.trigger_words) == ["sks", "tinytok"]
    assert image.resolution == 64
    assert image.parameter_count == _file_parameter_count(path)
    assert detection.missing_fields == []


def test_kohya_lora_without_summary_metadata(
    pipelines: dict[str, Path], models: Path, tmp_path: Path
) -> None:
    """Rank from the lora_down shapes, alpha from the `.alpha` tensors, trigger words from tag frequency."""
    from safetensors.torch import load_file, save_file

    from tinymodels.diffusion import build_kohya_lora

    original = build_kohya_lora(
        models / "bare-lora.safetensors", "sdxl", rank=4, alpha=3.0, pipeline_dir=pipelines["sdxl"]
    )
    metadata = read_header(original).metadata
    kept = {"ss_tag_frequency": metadata["ss_tag_frequency"]}  # sks/tinytok in 10 captions, photo in 3
    path = tmp_path / "bare.safetensors"
    save_file(load_file(str(original)), str(path), metadata=kept)

    image = detect(path).config
    assert isinstance(image, model_pb2.ImageConfig)
    assert image.base_model == model_pb2.IMAGE_BASE_MODEL_SDXL  # lora_te1_/lora_te2_ keys
    assert (image.lora_rank, image.lora_alpha) == (4, 3.0)
    assert list(image.trigger_words) == ["sks", "tinytok"]


@pytest.mark.parametrize(
    ("base", "dim", "expected"),
    [
        ("sd15", None, model_pb2.IMAGE_BASE_MODEL_UNSPECIFIED),  # a 32-wide vector names no real family
        ("sd15", 768, model_pb2.IMAGE_BASE_MODEL_SD_1_5),
        ("sdxl", None, model_pb2.IMAGE_BASE_MODEL_SDXL),
    ],
)
def test_textual_inversion(base: Base, dim: int | None, expected: int, tmp_path: Path) -> None:
    from tinymodels.diffusion import build_textual_inversion

    path = build_textual_inversion(tmp_path / "emb.safetensors", base, dim=dim, token="tinytok-emb")
    detection = detect(path)
    image = detection.config
    assert isinstance(image, model_pb2.ImageConfig)
    assert image.checkpoint_type == model_pb2.CHECKPOINT_TYPE_EMBEDDING
    assert image.base_model == expected
    assert list(image.trigger_words) == ["tinytok-emb"]
    assert ("base_model" in detection.missing_fields) is (expected == model_pb2.IMAGE_BASE_MODEL_UNSPECIFIED)


def test_vae_only_file(tmp_path: Path) -> None:
    from tinymodels.diffusion import build_vae_only

    path = build_vae_only(tmp_path / "vae.safetensors")
    image = detect(path).config
    assert isinstance(image, model_pb2.ImageConfig)
    assert image.checkpoint_type == model_pb2.CHECKPOINT_TYPE_VAE
    assert image.vae == "AutoencoderKL"
    assert image.parameter_count == _file_parameter_count(path)
    prefixed = _save_tensors(
        tmp_path / "prefixed.safetensors", {"first_stage_model.decoder.conv_in.weight": (4, 4, 3, 3)}
    )
    assert _image(prefixed).checkpoint_type == model_pb2.CHECKPOINT_TYPE_VAE


def test_civitai_sidecar_fills_what_the_header_cannot_say(tmp_path: Path) -> None:
    from tinymodels.diffusion import build_textual_inversion

    path = build_textual_inversion(tmp_path / "emb.safetensors", "sd15")
    info = {
        "trainedWords": ["mytrigger", "other word"],
        "baseModel": "SD 1.5",
        "model": {"name": "Tiny", "type": "TextualInversion", "nsfw": True, "tags": ["style", "tiny"]},
        "images": [{"url": "https://example.invalid/a.png"}, {"url": "https://example.invalid/b.png"}],
        "stats": {"downloadCount": 1234, "thumbsUpCount": 56},
    }
    (tmp_path / "emb.civitai.info").write_text(json.dumps(info), encoding="utf-8")
    (tmp_path / "emb.preview.png").write_bytes(b"\x89PNG")

    detection = detect(path)
    image = detection.config
    assert isinstance(image, model_pb2.ImageConfig)
    assert image.base_model == model_pb2.IMAGE_BASE_MODEL_SD_1_5
    assert list(image.trigger_words) == ["mytrigger", "other word"]
    assert image.nsfw is True
    assert list(image.previews) == [
        "https://example.invalid/a.png",
        "https://example.invalid/b.png",
        "emb.preview.png",
    ]
    assert (image.downloads, image.likes) == (1234, 56)
    assert list(image.tags) == ["style", "tiny"]
    assert detection.tags == ["style", "tiny"]
    assert detection.missing_fields == []


def test_a1111_json_sidecar(tmp_path: Path) -> None:
    from tinymodels.diffusion import build_textual_inversion

    path = build_textual_inversion(tmp_path / "style.safetensors", "sd15")
    (tmp_path / "style.json").write_text(
        json.dumps(
            {"description": "", "sd version": "SD2", "activation text": "foo, bar", "preferred weight": 0.8}
        ),
        encoding="utf-8",
    )
    image = detect(path).config
    assert isinstance(image, model_pb2.ImageConfig)
    assert image.base_model == model_pb2.IMAGE_BASE_MODEL_SD_2_1
    assert list(image.trigger_words) == ["foo", "bar"]


# --------------------------------------------------------------------------- bad input


def _error(call: Callable[[], Detection], kind: type[Exception]) -> Any:
    with pytest.raises(kind) as caught:
        call()
    return caught.value


def test_missing_path(tmp_path: Path) -> None:
    error = _error(lambda: detect(tmp_path / "nope"), NotFound)
    assert error.reason == "PATH_NOT_FOUND"


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    error = _error(lambda: detect(tmp_path / "empty"), InvalidArgument)
    assert error.reason == "EMPTY_MODEL_FOLDER"
    assert "empty" in error.message


def test_unrecognized_folder_says_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "misc").mkdir()
    (tmp_path / "misc" / "notes.txt").write_text("hello", encoding="utf-8")
    error = _error(lambda: detect(tmp_path / "misc"), InvalidArgument)
    assert error.reason == "UNRECOGNIZED_MODEL"
    for looked_for in ("adapter_config.json", "model_index.json", "config.json", ".gguf", ".safetensors"):
        assert looked_for in error.message
    assert "notes.txt" in error.message


def test_diffusers_component_folder_points_to_the_pipeline(pipelines: dict[str, Path]) -> None:
    error = _error(lambda: detect(pipelines["sd15"] / "unet"), InvalidArgument)
    assert error.reason == "UNRECOGNIZED_MODEL"
    assert "model_index.json" in error.message and "UNet2DConditionModel" in error.message


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "generation_config.json"])
def test_corrupt_json_names_the_file_and_line(name: str, llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(llm_dirs["llama"], tmp_path / "corrupt")
    text = (folder / name).read_text(encoding="utf-8")
    (folder / name).write_text(text.replace(",", "", 1), encoding="utf-8")  # drop the first comma
    error = _error(lambda: detect(folder), InvalidArgument)
    assert error.reason == "CORRUPT_JSON"
    assert error.metadata["file"] == name
    assert int(error.metadata["line"]) >= 1
    assert name in error.message and "line" in error.message


def test_truncated_safetensors(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(llm_dirs["llama"], tmp_path / "truncated")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    error = _error(lambda: detect(folder), InvalidArgument)
    assert error.reason == "CORRUPT_WEIGHTS"
    assert error.metadata["file"] == "model.safetensors"
    assert "truncated" in error.message


@pytest.mark.parametrize(
    "content",
    [
        (10**6).to_bytes(8, "little") + b"{}",  # header length larger than the file
        (5).to_bytes(8, "little") + b"{bad}",  # header is not JSON
        b"\x01\x02",  # shorter than the length prefix
    ],
    ids=["header-longer-than-file", "header-not-json", "too-short"],
)
def test_damaged_safetensors_headers(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    error = _error(lambda: detect(path), InvalidArgument)
    assert error.reason == "CORRUPT_WEIGHTS"


def test_truncated_gguf(models: Path, tmp_path: Path) -> None:
    from tinymodels.gguf_file import build_gguf

    full = build_gguf(models / "to-truncate.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(full[: len(full) // 3])
    error = _error(lambda: detect(path), InvalidArgument)
    assert error.reason == "CORRUPT_WEIGHTS"
