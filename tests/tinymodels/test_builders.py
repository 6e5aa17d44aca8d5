"""Each tinymodels builder produces artifacts the real libraries load and run."""

from __future__ import annotations

import hashlib
import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tinymodels.tokenizer import BOS_ID, EOS_ID, IM_END_ID, IM_START_ID, PAD_ID, UNK_ID  # noqa: E402

MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is the capital of France?"},
]
EXPECTED_PROMPT = (
    "<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def safetensors_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header (8-byte little-endian length + JSON)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header: dict[str, Any] = json.loads(handle.read(length))
    return header


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tinymodels.llm import build_llm

    return build_llm(tmp_path_factory.mktemp("llama") / "model", "llama")


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("separate", [False, True])
def test_tokenizer_with_chat_template(tmp_path: Path, separate: bool) -> None:
    from transformers import AutoTokenizer

    from tinymodels.tokenizer import build_tokenizer

    out = build_tokenizer(tmp_path / "tok", separate_chat_template_file=separate)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (out / "tokenizer.json").is_file()
    assert (out / "chat_template.jinja").is_file() is separate
    assert ("chat_template" in config) is not separate

    tok: Any = AutoTokenizer.from_pretrained(out)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert tok.convert_tokens_to_ids(["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]) == [
        PAD_ID,
        BOS_ID,
        EOS_ID,
        UNK_ID,
        IM_START_ID,
        IM_END_ID,
    ]
    prompt = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt == EXPECTED_PROMPT
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == EXPECTED_PROMPT.removesuffix(
        "<|im_start|>assistant\n"
    )
    ids = tok(prompt)["input_ids"]
    assert ids[0] == IM_START_ID and ids.count(IM_END_ID) == 2  # special tokens stay whole
    assert tok.decode(ids) == prompt
    assert tok.decode(tok("héllo wörld ✓")["input_ids"]) == "héllo wörld ✓"  # byte-level round trip
    # assistant-only masks work ({% generation %} markers)
    rendered: Any = tok.apply_chat_template(
        [*MESSAGES, {"role": "assistant", "content": "Paris."}],
        return_assistant_tokens_mask=True,
        return_dict=True,
    )
    assert 0 < sum(rendered["assistant_masks"]) < len(rendered["input_ids"])


# --------------------------------------------------------------------------------------
# LLMs and LoRA
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mistral"])
def test_llm_loads_and_generates(tmp_path: Path, arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from tinymodels.llm import build_llm

    start = time.perf_counter()
    out = build_llm(tmp_path / arch, arch)  # type: ignore[arg-type]
    assert time.perf_counter() - start < 5
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()

    model: Any = AutoModelForCausalLM.from_pretrained(out)
    tok: Any = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tok)
    context = model.config.n_positions if arch == "gpt2" else model.config.max_position_embeddings
    assert context == 256
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert head_dim == 32

    gen = GenerationConfig.from_pretrained(out)
    assert gen.do_sample is True and gen.temperature == 0.7 and gen.top_p == 0.9
    assert gen.eos_token_id == [EOS_ID, IM_END_ID]

    inputs: Any = tok.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    first = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    again = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert first.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(first, again)
    new_tokens = first[0, inputs["input_ids"].shape[1] :].tolist()
    assert not {PAD_ID, UNK_ID} & set(new_tokens)  # suppressed in the LM head
    sampled = model.generate(**inputs, max_new_tokens=4)  # uses generation_config (sampling)
    assert sampled.shape[1] > inputs["input_ids"].shape[1]


def test_llm_is_deterministic(tmp_path: Path, llama_dir: Path) -> None:
    from tinymodels.llm import build_llm

    same = build_llm(tmp_path / "same", "llama")
    other = build_llm(tmp_path / "other", "llama", seed=1)
    assert sha256(same / "model.safetensors") == sha256(llama_dir / "model.safetensors")
    assert sha256(other / "model.safetensors") != sha256(llama_dir / "model.safetensors")
    assert (same / "tokenizer.json").read_bytes() == (llama_dir / "tokenizer.json").read_bytes()


def test_llm_bfloat16(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tinymodels.llm import build_llm

    out = build_llm(tmp_path / "bf16", "qwen2", dtype="bfloat16")
    header = safetensors_header(out / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_lora_adapter_changes_output(tmp_path: Path, llama_dir: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tinymodels.llm import build_lora_adapter

    out = build_lora_adapter(llama_dir, tmp_path / "lora", r=8, alpha=16)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(llama_dir)
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)

    ids = torch.tensor([[IM_START_ID, 60, 61, 62, 63]])
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():
        base_logits = base(ids).logits
    adapted = PeftModel.from_pretrained(base, out)
    with torch.no_grad():
        lora_logits = adapted(ids).logits
    assert not torch.allclose(base_logits, lora_logits, atol=1e-3)

    named = build_lora_adapter(llama_dir, tmp_path / "named", base_model_name="tiny-org/tiny-llama")
    assert (
        json.loads((named / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "tiny-org/tiny-llama"
    )


# --------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------


def test_gguf_metadata(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    from tinymodels.gguf_file import build_gguf
    from tinymodels.tokenizer import CHAT_TEMPLATE

    path = build_gguf(tmp_path / "tiny-q4.gguf", file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M)
    reader = gguf.GGUFReader(path)

    def field(key: str) -> Any:
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert gguf.LlamaFileType(field("general.file_type")).name == "MOSTLY_Q4_K_M"
    assert field("llama.context_length") == 256
    assert field("llama.embedding_length") == 64
    assert field("llama.block_count") == 2
    assert field("llama.feed_forward_length") == 128
    assert field("llama.attention.head_count") == 2
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.chat_template") == CHAT_TEMPLATE
    tokens = field("tokenizer.ggml.tokens")
    assert tokens[:6] == ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    assert 100_000 < n_params < 200_000


def test_gguf_loads_in_transformers(tmp_path: Path, llama_dir: Path) -> None:
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinymodels.gguf_file import build_gguf

    path = build_gguf(tmp_path / "tiny-f32.gguf", tensor_type="f32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    reference = AutoModelForCausalLM.from_pretrained(llama_dir)
    reference_tok = AutoTokenizer.from_pretrained(llama_dir)

    prompt = reference_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = reference_tok(prompt, return_tensors="pt")["input_ids"]
    assert torch.equal(tok(prompt, return_tensors="pt")["input_ids"], ids)
    with torch.no_grad():
        assert model.dtype == torch.float32
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)
    assert tok.chat_template is not None


# --------------------------------------------------------------------------------------
# Hugging Face cache
# --------------------------------------------------------------------------------------


def test_hf_cache_resolves(tmp_path: Path, llama_dir: Path) -> None:
    import huggingface_hub

    from tinymodels.hf_cache import build_hf_cache

    cache = tmp_path / "hub"
    snapshot = build_hf_cache(cache, "tiny-org/tiny-llama", llama_dir)
    commit = snapshot.name
    assert len(commit) == 40
    assert (cache / "models--tiny-org--tiny-llama" / "refs" / "main").read_text() == commit
    link = snapshot / "model.safetensors"
    assert link.is_symlink() and not Path(link.readlink()).is_absolute()
    assert link.resolve().name == sha256(llama_dir / "model.safetensors")  # LFS blobs are named by sha256

    resolved = huggingface_hub.snapshot_download(
        "tiny-org/tiny-llama", cache_dir=cache, local_files_only=True
    )
    assert Path(resolved) == snapshot
    config = huggingface_hub.hf_hub_download(
        "tiny-org/tiny-llama", "config.json", cache_dir=cache, local_files_only=True
    )
    assert json.loads(Path(config).read_text())["model_type"] == "llama"

    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "tiny-org/tiny-llama"
    (revision,) = repo.revisions
    assert revision.commit_hash == commit and "main" in revision.refs
    assert {f.file_name for f in revision.files} == {p.name for p in llama_dir.iterdir()}

    pinned = build_hf_cache(cache, "tiny-org/other", llama_dir, revision_hash="a" * 40)
    assert pinned.name == "a" * 40


# --------------------------------------------------------------------------------------
# Diffusion
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers")
    from tinymodels.diffusion import build_sd15_pipeline

    return build_sd15_pipeline(tmp_path_factory.mktemp("sd15") / "pipe")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers")
    from tinymodels.diffusion import build_sdxl_pipeline

    return build_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


def _load_pipeline(folder: Path) -> Any:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(image: Any) -> Any:
    import numpy as np

    return np.asarray(image).astype(np.int16)


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_pipeline_generates_64px_deterministically(base: str, request: pytest.FixtureRequest) -> None:
    from tinymodels.diffusion import generate

    folder: Path = request.getfixturevalue(f"{base}_dir")
    assert (folder / "model_index.json").is_file()
    assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = _load_pipeline(folder)
    assert type(pipe).__name__ == (
        "StableDiffusionPipeline" if base == "sd15" else "StableDiffusionXLPipeline"
    )

    generate(pipe, seed=0)  # warm-up
    start = time.perf_counter()
    image = generate(pipe, seed=0)
    elapsed = time.perf_counter() - start
    assert image.size == (64, 64)
    assert elapsed < 3.0  # ~0.1 s here; generous for loaded CI machines
    assert (_pixels(generate(pipe, seed=0)) == _pixels(image)).all()
    assert (_pixels(generate(pipe, seed=1)) != _pixels(image)).any()
    assert _pixels(image).std() > 0


def test_sd15_single_file(tmp_path: Path, sd15_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from tinymodels.diffusion import build_sd_single_file, generate

    path = build_sd_single_file(
        tmp_path / "tiny-sd15.safetensors", "sd15", pipeline_dir=sd15_dir, dtype=torch.float32
    )
    header = safetensors_header(path)
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
        "first_stage_model.encoder.conv_in.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
    ):
        assert key in header, key
    assert header["model.diffusion_model.input_blocks.0.0.weight"]["shape"][1] == 4  # not inpainting
    assert not any(k.startswith("conditioner.") for k in header)
    keys = {k: torch.empty(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    assert infer_diffusers_model_type(keys) == "v1"

    # the single file holds exactly the folder's weights
    single = StableDiffusionPipeline.from_single_file(str(path), config=str(sd15_dir), local_files_only=True)
    single.set_progress_bar_config(disable=True)
    folder = _load_pipeline(sd15_dir)
    for name in ("unet", "vae", "text_encoder"):
        expected = getattr(folder, name).state_dict()
        loaded = getattr(single, name).state_dict()
        assert all(torch.equal(expected[k], loaded[k]) for k in expected), name
    difference = abs(_pixels(generate(single)) - _pixels(generate(folder))).max()
    assert difference <= 2


def test_sdxl_single_file(tmp_path: Path, sdxl_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from tinymodels.diffusion import build_sd_single_file

    path = build_sd_single_file(tmp_path / "tiny-sdxl.safetensors", "sdxl", pipeline_dir=sdxl_dir)
    header = safetensors_header(path)
    for key in (
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
        "first_stage_model.decoder.conv_out.weight",
    ):
        assert key in header, key
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    keys = {k: torch.empty(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    assert infer_diffusers_model_type(keys) == "xl_base"

    single = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(sdxl_dir), local_files_only=True
    )
    folder = _load_pipeline(sdxl_dir)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        expected = getattr(folder, name).state_dict()
        loaded = getattr(single, name).state_dict()
        assert all(torch.allclose(expected[k], loaded[k].float(), atol=1e-2) for k in expected), name


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_kohya_lora(tmp_path: Path, base: str, request: pytest.FixtureRequest) -> None:
    from safetensors import safe_open

    from tinymodels.diffusion import build_kohya_lora, generate

    folder: Path = request.getfixturevalue(f"{base}_dir")
    path = build_kohya_lora(tmp_path / f"{base}-lora.safetensors", base, rank=4, alpha=2, pipeline_dir=folder)  # type: ignore[arg-type]
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
    assert metadata["ss_base_model_version"] == ("sd_v1" if base == "sd15" else "sdxl_base_v1-0")
    assert metadata["ss_network_dim"] == "4" and float(metadata["ss_network_alpha"]) == 2.0
    assert metadata["ss_resolution"] == "(64, 64)"
    tags = json.loads(metadata["ss_tag_frequency"])
    assert "sks" in next(iter(tags.values()))
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_up.weight") for k in keys)
    assert any(k.endswith(".alpha") for k in keys)
    te_prefixes = (
        ("lora_te_text_model_",) if base == "sd15" else ("lora_te1_text_model_", "lora_te2_text_model_")
    )
    for prefix in te_prefixes:
        assert any(k.startswith(prefix) for k in keys), prefix
    if base == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_") for k in keys)

    pipe = _load_pipeline(folder)
    before = _pixels(generate(pipe))
    pipe.load_lora_weights(str(path))
    after = _pixels(generate(pipe))
    assert (before != after).any()


def test_textual_inversion(tmp_path: Path, sd15_dir: Path) -> None:
    from safetensors import safe_open

    from tinymodels.diffusion import build_textual_inversion, generate

    path = build_textual_inversion(tmp_path / "emb.safetensors", "sd15", num_vectors=2)
    with safe_open(str(path), "pt") as handle:
        assert list(handle.keys()) == ["emb_params"]
        assert list(handle.get_tensor("emb_params").shape) == [2, 32]
    xl = build_textual_inversion(tmp_path / "emb-xl.safetensors", "sdxl")
    assert set(safetensors_header(xl)) - {"__metadata__"} == {"clip_l", "clip_g"}

    pipe = _load_pipeline(sd15_dir)
    pipe.load_textual_inversion(str(path), token="<tiny>")
    assert generate(pipe, "a photo of <tiny>").size == (64, 64)


def test_vae_only(tmp_path: Path, sd15_dir: Path) -> None:
    from diffusers import AutoencoderKL

    from tinymodels.diffusion import build_vae_only

    path = build_vae_only(tmp_path / "vae.safetensors")
    header = safetensors_header(path)
    keys = set(header) - {"__metadata__"}
    assert {
        "encoder.conv_in.weight",
        "decoder.conv_out.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
    } <= keys
    assert "encoder.mid.attn_1.q.weight" in keys and len(header["encoder.mid.attn_1.q.weight"]["shape"]) == 4
    assert all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in keys)
    vae = AutoencoderKL.from_single_file(
        str(path), config=str(sd15_dir), subfolder="vae", local_files_only=True
    )
    assert vae.config.latent_channels == 4


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tinymodels.__main__ import main

    assert main(["tokenizer", str(tmp_path / "tok"), "--separate-chat-template-file"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "tok")
    assert (tmp_path / "tok" / "chat_template.jinja").is_file()
    with pytest.raises(SystemExit):
        main(["--help"])
