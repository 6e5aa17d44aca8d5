"""Tiny Stable Diffusion (1.5 / XL) pipelines and the single-file artifacts around them.

Everything is built locally with random weights:

* :func:`build_sd15_pipeline` / :func:`build_sdxl_pipeline`: diffusers folders
  (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder(_2)/``, ``tokenizer(_2)/``,
  ``scheduler/``) saved as safetensors, making 64x64 images in well under a second.  The
  networks keep the *block structure* of the real models (SD1.5: 4 UNet levels with 2
  layers each, 12 input/output blocks; SDXL: 3 levels, ``text_time`` conditioning, an
  OpenCLIP-style second text encoder with 10 layers; VAE: 4 levels) with tiny widths, so the
  original-layout key names exist exactly as in real checkpoints.
* :func:`build_sd_single_file`: the same weights converted to the original LDM/SGM
  "single file" layout (``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.transformer.*`` / ``conditioner.embedders.{0,1}.*``).  diffusers'
  ``single_file_utils`` classifies them as ``v1`` / ``xl_base`` and
  ``Pipeline.from_single_file(path, config=<pipeline folder>)`` loads them offline.
* :func:`build_kohya_lora`, :func:`build_textual_inversion`, :func:`build_vae_only`:
  kohya-ss LoRA (with ``ss_*`` metadata), A1111-style embeddings, an LDM VAE file.

Set ``torch.set_num_threads(1)`` around generation on small CPUs (see :func:`generate`);
with 2 threads runs were seen to stall.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

Base = Literal["sd15", "sdxl"]

IMAGE_SIZE = 64
"""Default image height/width of the tiny pipelines."""

_LATENT_SIZE = IMAGE_SIZE // 8  # the VAE has 4 levels: scale factor 8, like the real ones
_TEXT_HIDDEN = 32
_TEXT_HIDDEN_2 = 64  # SDXL's second (OpenCLIP bigG-like) encoder; must differ from _TEXT_HIDDEN
_TEXT_PROJECTION = 32
_TIME_EMBED_DIM = 8

_PROMPT_WORDS = (
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "with",
    "and",
    "photo",
    "painting",
    "drawing",
    "portrait",
    "cat",
    "dog",
    "bird",
    "horse",
    "car",
    "house",
    "tree",
    "flower",
    "mountain",
    "river",
    "city",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "small",
    "big",
    "old",
    "new",
    "happy",
    "sunset",
    "night",
    "day",
    "sky",
    "sea",
    "forest",
    "street",
    "robot",
    "castle",
    "boat",
    "high",
    "quality",
    "detailed",
    "style",
    "art",
    "masterpiece",
    "tinytok",
    "sks",
)


# --------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A minimal CLIP BPE vocabulary: bytes, bytes + ``</w>``, merges of common words, specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab_list: list[str] = alphabet + [symbol + "</w>" for symbol in alphabet]
    merges: list[str] = []
    known = set(vocab_list)
    for word in _PROMPT_WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            merged = pieces[0] + pieces[1]
            if merge not in merges:
                merges.append(merge)
            if merged not in known:
                known.add(merged)
                vocab_list.append(merged)
            pieces = [merged, *pieces[2:]]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(vocab_list)}, merges


def make_clip_tokenizer(out_dir: Path | None = None):
    """Return a local ``CLIPTokenizer``; with ``out_dir``, also save it there.

    Saved folders hold ``vocab.json`` and ``merges.txt`` (the classic CLIP files) as well as
    whatever ``save_pretrained`` writes (``tokenizer.json``, ``tokenizer_config.json`` ...).
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    pairs: Any = [tuple(merge.split(" ")) for merge in merges]  # tokenizers wants (a, b) tuples
    tokenizer = CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=77)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out_dir))
        (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return tokenizer


def _clip_text_config(vocab_size: int, *, layers: int, hidden_act: str, hidden_size: int = _TEXT_HIDDEN):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=_TEXT_PROJECTION,
        hidden_act=hidden_act,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _make_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
    )


def _make_scheduler(base: Base):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def make_sd15_pipeline(seed: int = 0):
    """Return an in-memory tiny ``StableDiffusionPipeline`` (random weights, seeded)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        cross_attention_dim=_TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = _make_vae(scaling_factor=0.18215)
    tokenizer = make_clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(len(tokenizer), layers=2, hidden_act="quick_gelu"))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_make_scheduler("sd15"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_sdxl_pipeline(seed: int = 0):
    """Return an in-memory tiny ``StableDiffusionXLPipeline`` (random weights, seeded)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 2),
        use_linear_projection=True,
        cross_attention_dim=_TEXT_HIDDEN + _TEXT_HIDDEN_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * _TIME_EMBED_DIM + _TEXT_PROJECTION,
        norm_num_groups=32,
    )
    vae = _make_vae(scaling_factor=0.13025)
    tokenizer = make_clip_tokenizer()
    tokenizer_2 = make_clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(len(tokenizer), layers=2, hidden_act="quick_gelu"))
    # 10 layers so that the real SDXL marker key `...resblocks.9.mlp.c_proj.bias` exists, and a
    # width different from text_encoder's: diffusers' single-file loader tells the two
    # encoders apart by their position-embedding width (768 vs 1280 in the real model).
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(len(tokenizer_2), layers=10, hidden_act="gelu", hidden_size=_TEXT_HIDDEN_2)
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_make_scheduler("sdxl"),
        force_zeros_for_empty_prompt=True,
    )


def _save_pipeline(pipe: Any, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        if (out / name).is_dir():
            vocab, merges = _clip_vocab_and_merges()
            (out / name / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
            (out / name / "merges.txt").write_text(
                "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
            )
    return out


def build_sd15_pipeline(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny SD1.5-structured ``StableDiffusionPipeline`` (64x64 images) to ``out_dir``."""
    return _save_pipeline(make_sd15_pipeline(seed), out_dir)


def build_sdxl_pipeline(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny SDXL-structured ``StableDiffusionXLPipeline`` (64x64 images) to ``out_dir``."""
    return _save_pipeline(make_sdxl_pipeline(seed), out_dir)


def generate(pipe: Any, prompt: str = "a photo of a cat", *, seed: int = 0, steps: int = 2, **kwargs: Any):
    """Run ``pipe`` once with one torch thread and a seeded generator; return the PIL image."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator("cpu").manual_seed(seed)
        result = pipe(prompt, num_inference_steps=steps, generator=generator, **kwargs)
        return result.images[0]
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------
# diffusers -> original (LDM / SGM) key layout
# --------------------------------------------------------------------------------------

_RESNET_RENAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


def _unet_prefix_map(config: Any) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix, derived from the UNet's config."""
    n_levels = len(config.block_out_channels)
    per_level = config.layers_per_block
    mapping: dict[str, str] = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    for level in range(n_levels):
        for layer in range(per_level):
            block = 1 + level * (per_level + 1) + layer
            mapping[f"down_blocks.{level}.resnets.{layer}."] = f"input_blocks.{block}.0."
            mapping[f"down_blocks.{level}.attentions.{layer}."] = f"input_blocks.{block}.1."
        if level < n_levels - 1:
            mapping[f"down_blocks.{level}.downsamplers.0.conv."] = (
                f"input_blocks.{(level + 1) * (per_level + 1)}.0.op."
            )
        has_attention = "CrossAttn" in config.up_block_types[level]
        for layer in range(per_level + 1):
            block = level * (per_level + 1) + layer
            mapping[f"up_blocks.{level}.resnets.{layer}."] = f"output_blocks.{block}.0."
            mapping[f"up_blocks.{level}.attentions.{layer}."] = f"output_blocks.{block}.1."
        if level < n_levels - 1:
            block = level * (per_level + 1) + per_level
            mapping[f"up_blocks.{level}.upsamplers.0.conv."] = (
                f"output_blocks.{block}.{2 if has_attention else 1}.conv."
            )
    return mapping


def _rename_by_prefix(key: str, prefix_map: dict[str, str]) -> tuple[str, str]:
    """Return ``(new_prefix + rest, rest)`` for the longest matching prefix of ``key``."""
    for prefix in sorted(prefix_map, key=len, reverse=True):
        if key.startswith(prefix):
            return prefix_map[prefix] + key[len(prefix) :], key[len(prefix) :]
    raise KeyError(f"no LDM name for {key!r}")


def unet_to_ldm(unet: Any) -> dict[str, torch.Tensor]:
    """Convert a diffusers ``UNet2DConditionModel`` state dict to LDM names (no prefix)."""
    prefix_map = _unet_prefix_map(unet.config)
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        new_key, rest = _rename_by_prefix(key, prefix_map)
        if ".resnets." in key:
            head = new_key[: len(new_key) - len(rest)]
            for old, new in _RESNET_RENAMES:
                if rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            new_key = head + rest
        out[new_key] = value
    return out


def vae_to_ldm(vae: Any) -> dict[str, torch.Tensor]:
    """Convert a diffusers ``AutoencoderKL`` state dict to LDM names (no prefix).

    Mid-block attention projections become 1x1 convolutions, as in the original files.
    """
    n_levels = len(vae.config.block_out_channels)
    prefix_map: dict[str, str] = {}
    for part in ("encoder", "decoder"):
        prefix_map[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        prefix_map[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        prefix_map[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
        prefix_map[f"{part}.conv_norm_out."] = f"{part}.norm_out."
    for level in range(n_levels):
        prefix_map[f"encoder.down_blocks.{level}.resnets."] = f"encoder.down.{level}.block."
        prefix_map[f"encoder.down_blocks.{level}.downsamplers.0."] = f"encoder.down.{level}.downsample."
        ldm_level = n_levels - 1 - level  # decoder levels are numbered in reverse
        prefix_map[f"decoder.up_blocks.{level}.resnets."] = f"decoder.up.{ldm_level}.block."
        prefix_map[f"decoder.up_blocks.{level}.upsamplers.0."] = f"decoder.up.{ldm_level}.upsample."
    attention_renames = {
        "group_norm.": "norm.",
        "to_q.": "q.",
        "to_k.": "k.",
        "to_v.": "v.",
        "to_out.0.": "proj_out.",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        matches = [p for p in prefix_map if key.startswith(p)]
        if not matches:
            out[key] = value  # encoder.conv_in, decoder.conv_out, quant_conv, post_quant_conv ...
            continue
        prefix = max(matches, key=len)
        rest = key[len(prefix) :]
        if ".attentions." in prefix:
            for old, new in attention_renames.items():
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            if rest.endswith("weight") and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        rest = rest.replace("conv_shortcut.", "nin_shortcut.")
        out[prefix_map[prefix] + rest] = value
    return out


def _clip_state_dict(text_encoder: Any) -> dict[str, torch.Tensor]:
    """The text encoder's state dict with the classic ``text_model.`` key prefix.

    transformers >= 5.6 flattened ``CLIPTextModel`` (keys ``embeddings...``, ``encoder...``),
    while original checkpoints and ``CLIPTextModelWithProjection`` use ``text_model.*``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in text_encoder.state_dict().items():
        if key.startswith("text_model.") or key.startswith("text_projection."):
            out[key] = value
        else:
            out["text_model." + key] = value
    return out


def openclip_from_hf(text_encoder: Any) -> dict[str, torch.Tensor]:
    """Convert a ``CLIPTextModelWithProjection`` state dict to OpenCLIP names (no prefix)."""
    state = _clip_state_dict(text_encoder)
    out: dict[str, torch.Tensor] = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T.contiguous(),
    }
    for layer in range(text_encoder.config.num_hidden_layers):
        hf = f"text_model.encoder.layers.{layer}."
        oc = f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[oc + f"attn.in_proj_{kind}"] = torch.cat(
                [state[hf + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
            out[oc + f"attn.out_proj.{kind}"] = state[hf + f"self_attn.out_proj.{kind}"]
            out[oc + f"ln_1.{kind}"] = state[hf + f"layer_norm1.{kind}"]
            out[oc + f"ln_2.{kind}"] = state[hf + f"layer_norm2.{kind}"]
            out[oc + f"mlp.c_fc.{kind}"] = state[hf + f"mlp.fc1.{kind}"]
            out[oc + f"mlp.c_proj.{kind}"] = state[hf + f"mlp.fc2.{kind}"]
    return out


def pipeline_to_ldm(pipe: Any, base: Base) -> dict[str, torch.Tensor]:
    """All weights of a tiny pipeline under their original single-file names."""
    state: dict[str, torch.Tensor] = {}
    state.update({"model.diffusion_model." + k: v for k, v in unet_to_ldm(pipe.unet).items()})
    state.update({"first_stage_model." + k: v for k, v in vae_to_ldm(pipe.vae).items()})
    text_state = _clip_state_dict(pipe.text_encoder)
    if base == "sd15":
        state.update({"cond_stage_model.transformer." + k: v for k, v in text_state.items()})
    else:
        state.update({"conditioner.embedders.0.transformer." + k: v for k, v in text_state.items()})
        state.update(
            {
                "conditioner.embedders.1.model." + k: v
                for k, v in openclip_from_hf(pipe.text_encoder_2).items()
            }
        )
    return {k: v.detach().contiguous() for k, v in state.items() if not k.endswith("position_ids")}


# --------------------------------------------------------------------------------------
# Single-file artifacts
# --------------------------------------------------------------------------------------


def _save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    from safetensors.torch import save_file

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata=metadata)
    return out


def _load_or_make_pipeline(base: Base, pipeline_dir: str | Path | None, seed: int):
    if pipeline_dir is None:
        return make_sd15_pipeline(seed) if base == "sd15" else make_sdxl_pipeline(seed)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(pipeline_dir), local_files_only=True)


def build_sd_single_file(
    path: str | Path,
    base: Base = "sd15",
    *,
    seed: int = 0,
    pipeline_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a single-file (LDM / SGM layout) checkpoint of a tiny pipeline to ``path``.

    The weights are those of :func:`build_sd15_pipeline` / :func:`build_sdxl_pipeline`
    (same ``seed``), or of the pipeline folder ``pipeline_dir``, renamed as in the original
    checkpoints.  Identifying keys include, for SD1.5,
    ``model.diffusion_model.input_blocks.0.0.weight``,
    ``model.diffusion_model.output_blocks.11.0.skip_connection.weight``,
    ``cond_stage_model.transformer.text_model.embeddings.position_embedding.weight`` and
    ``first_stage_model.encoder.conv_in.weight``; for SDXL
    ``model.diffusion_model.label_emb.0.0.weight``,
    ``conditioner.embedders.0.transformer.text_model...`` and
    ``conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias``.
    ``Pipeline.from_single_file(path, config=<pipeline folder>)`` loads it.

    Args:
        dtype: storage dtype (real checkpoints are usually fp16).
    """
    if base not in ("sd15", "sdxl"):
        raise ValueError(f"base must be 'sd15' or 'sdxl', got {base!r}")
    pipe = _load_or_make_pipeline(base, pipeline_dir, seed)
    state = {k: v.to(dtype) for k, v in pipeline_to_ldm(pipe, base).items()}
    return _save_safetensors(state, path, metadata={"format": "pt"})


def build_vae_only(
    path: str | Path, base: Base = "sd15", *, seed: int = 0, dtype: torch.dtype = torch.float16
) -> Path:
    """Write a VAE-only single file in the original layout (``encoder.*``, ``decoder.*``,
    ``quant_conv.*``, ``post_quant_conv.*``; no ``first_stage_model.`` prefix), like
    ``vae-ft-mse-840000-ema-pruned.safetensors``."""
    torch.manual_seed(seed)
    vae = _make_vae(scaling_factor=0.18215 if base == "sd15" else 0.13025)
    state = {k: v.to(dtype) for k, v in vae_to_ldm(vae).items()}
    return _save_safetensors(state, path, metadata={"format": "pt"})


def _lora_targets(pipe: Any, base: Base, unet_naming: str) -> list[tuple[str, Any]]:
    """(kohya module name, nn.Linear) pairs: UNet attention projections + text encoder attention/MLP."""
    targets: list[tuple[str, Any]] = []
    prefix_map = _unet_prefix_map(pipe.unet.config)
    for name, module in pipe.unet.named_modules():
        is_attention = ".attn1." in name or ".attn2." in name
        if is_attention and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            if unet_naming == "ldm":
                name, _ = _rename_by_prefix(name, prefix_map)
            targets.append(("lora_unet_" + name.replace(".", "_"), module))
    encoders = (
        [("lora_te_", pipe.text_encoder)]
        if base == "sd15"
        else [
            ("lora_te1_", pipe.text_encoder),
            ("lora_te2_", pipe.text_encoder_2),
        ]
    )
    for prefix, encoder in encoders:
        for name, module in encoder.named_modules():
            if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")):
                # kohya names use the classic `text_model.` path (flattened away in transformers 5.6+)
                full = name if name.startswith("text_model.") else "text_model." + name
                targets.append((prefix + full.replace(".", "_"), module))
    return targets


def build_kohya_lora(
    path: str | Path,
    base: Base = "sd15",
    *,
    rank: int = 4,
    alpha: float = 4.0,
    seed: int = 0,
    trigger_words: tuple[str, ...] = ("sks", "tinytok"),
    resolution: int = IMAGE_SIZE,
    pipeline_dir: str | Path | None = None,
    unet_naming: Literal["diffusers", "ldm"] | None = None,
) -> Path:
    """Write a kohya-ss (sd-scripts) LoRA ``.safetensors`` for the tiny pipeline of ``base``.

    Keys: ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` /
    ``.alpha`` and ``lora_te_text_model_...`` (SD1.5) or ``lora_te1_...`` / ``lora_te2_...``
    (SDXL), with shapes matching the tiny pipeline, so ``pipe.load_lora_weights(path)``
    applies it.  UNet module paths follow ``unet_naming``: ``"diffusers"``
    (``lora_unet_down_blocks_0_attentions_0_...``, what kohya writes for SD1.x) or ``"ldm"``
    (``lora_unet_input_blocks_4_1_transformer_blocks_0_...``, what kohya writes for SDXL);
    the default is the one kohya uses for ``base``.  (diffusers loads both namings for SDXL,
    only ``"diffusers"`` naming for SD1.5.)
    ``__metadata__`` holds ``ss_base_model_version`` (``"sd_v1"`` / ``"sdxl_base_v1-0"``),
    ``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``, ``ss_resolution``,
    ``ss_tag_frequency`` (JSON with the trigger words) and more ``ss_*`` fields.
    """
    if base not in ("sd15", "sdxl"):
        raise ValueError(f"base must be 'sd15' or 'sdxl', got {base!r}")
    pipe = _load_or_make_pipeline(base, pipeline_dir, seed)
    generator = torch.Generator("cpu").manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    naming = unet_naming if unet_naming is not None else ("diffusers" if base == "sd15" else "ldm")
    for name, module in _lora_targets(pipe, base, naming):
        out_features, in_features = module.weight.shape
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    tensors = {k: v.to(torch.float16) for k, v in tensors.items()}
    tag_frequency = {"1_" + trigger_words[0]: {word: 10 for word in trigger_words} | {"photo": 3}}
    metadata = {
        "ss_base_model_version": "sd_v1" if base == "sd15" else "sdxl_base_v1-0",
        "ss_sd_model_name": "tiny-sd15.safetensors" if base == "sd15" else "tiny-sdxl.safetensors",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_num_train_images": "10",
        "ss_num_epochs": "1",
        "ss_learning_rate": "0.0001",
        "ss_output_name": Path(path).stem,
        "ss_v2": "False",
        "modelspec.architecture": "stable-diffusion-v1/lora"
        if base == "sd15"
        else "stable-diffusion-xl-v1-base/lora",
        "modelspec.trigger_phrase": ", ".join(trigger_words),
    }
    return _save_safetensors(tensors, path, metadata=metadata)


def build_textual_inversion(
    path: str | Path,
    base: Base = "sd15",
    *,
    num_vectors: int = 2,
    dim: int | None = None,
    dim_g: int | None = None,
    seed: int = 0,
    token: str = "tinytok-emb",
) -> Path:
    """Write an A1111-style textual-inversion embedding ``.safetensors``.

    SD1.5: one tensor ``emb_params`` of shape ``(num_vectors, dim)``; SDXL: ``clip_l``
    ``(num_vectors, dim)`` and ``clip_g`` ``(num_vectors, dim_g)``.  ``dim``/``dim_g`` default
    to the tiny text encoders' widths (32 / 64), so ``pipe.load_textual_inversion(path,
    token=...)`` works on the tiny SD1.5 pipeline; pass 768 (and 1280) to mimic real files.
    Metadata records ``name`` and ``base``.
    """
    width = dim if dim is not None else _TEXT_HIDDEN
    generator = torch.Generator("cpu").manual_seed(seed)
    if base == "sd15":
        tensors = {"emb_params": torch.randn(num_vectors, width, generator=generator) * 0.02}
    elif base == "sdxl":
        tensors = {
            "clip_l": torch.randn(num_vectors, width, generator=generator) * 0.02,
            "clip_g": torch.randn(
                num_vectors, dim_g if dim_g is not None else _TEXT_HIDDEN_2, generator=generator
            )
            * 0.02,
        }
    else:
        raise ValueError(f"base must be 'sd15' or 'sdxl', got {base!r}")
    return _save_safetensors(tensors, path, metadata={"name": token, "base": base})
