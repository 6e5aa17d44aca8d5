"""The zoo of tiny causal LMs: many model types, each builds, loads and generates greedily."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tinymodels.tokenizer import BOS_ID, EOS_ID, IM_END_ID, MODEL_MAX_LENGTH, PAD_ID, UNK_ID  # noqa: E402
from tinymodels.zoo import DTYPES, ZOO, ZooSpec, build_zoo_model, by_key, model_types  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]

EXTRA_FIELDS: dict[str, set[str]] = {"qwen2-head16": {"head_dim"}}
"""Config fields a spec sets that its config class does not declare (read by the modeling code)."""


def test_zoo_covers_many_model_types() -> None:
    types = model_types()
    assert len(types) >= 28
    assert types == sorted(set(types))
    assert set(types) == {spec.model_type for spec in ZOO}
    for expected in ("llama", "mistral", "mixtral", "qwen2", "qwen3_moe", "gemma2", "gpt2", "falcon"):
        assert expected in types


def test_keys_are_unique_and_specs_are_described() -> None:
    keys = [spec.key for spec in ZOO]
    assert len(keys) == len(set(keys))
    for spec in ZOO:
        assert spec.key and " " not in spec.key, spec
        assert spec.dtype in DTYPES, spec.key
        assert spec.note and "\n" not in spec.note, spec.key
    for key in ("llama-tied", "llama-bf16", "llama-fp16", "mistral-sliding", "qwen2-head16", "llama-head80"):
        assert by_key(key).key == key


def test_by_key_unknown() -> None:
    with pytest.raises(KeyError, match="no zoo model 'nope'"):
        by_key("nope")


def test_config_fields_are_known() -> None:
    """transformers keeps unknown config kwargs silently: catch misspelt fields here."""
    from transformers import AutoConfig

    for spec in ZOO:
        default = AutoConfig.for_model(spec.model_type)
        known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
        unknown = set(spec.config) - known - EXTRA_FIELDS.get(spec.key, set())
        assert not unknown, f"{spec.key}: {sorted(unknown)} are not fields of {type(default).__name__}"


@pytest.mark.parametrize("spec", ZOO, ids=[spec.key for spec in ZOO])
def test_builds_loads_and_generates(tmp_path: Path, spec: ZooSpec) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = build_zoo_model(spec, tmp_path / spec.key)
    weights = out / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 2_000_000

    model: Any = AutoModelForCausalLM.from_pretrained(out)
    tok: Any = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == spec.model_type
    assert model.dtype == getattr(torch, spec.dtype)
    assert model.config.vocab_size == len(tok)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        BOS_ID,
        EOS_ID,
        PAD_ID,
    )
    gen = GenerationConfig.from_pretrained(out)
    assert gen.do_sample is True and gen.eos_token_id == [EOS_ID, IM_END_ID]
    head = model.get_output_embeddings().weight
    assert not head[[PAD_ID, UNK_ID]].any()

    inputs: Any = tok.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    # min_new_tokens: some models (mixtral) pick </s> greedily within 4 tokens of this prompt.
    output = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new_tokens) == 4, new_tokens
    assert not {PAD_ID, UNK_ID} & set(new_tokens)


def test_qwen2_head16_has_head_size_16(tmp_path: Path) -> None:
    out = build_zoo_model(by_key("qwen2-head16"), tmp_path / "qwen2-head16")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["head_dim"] == 16
    assert config["hidden_size"] // config["num_attention_heads"] == 16


def test_variants(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    def config_of(key: str) -> dict[str, Any]:
        return json.loads((build_zoo_model(by_key(key), tmp_path / key) / "config.json").read_text())

    assert config_of("llama-tied")["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(tmp_path / "llama-tied" / "model.safetensors")
    sliding = config_of("mistral-sliding")
    assert sliding["sliding_window"] < sliding["max_position_embeddings"] == MODEL_MAX_LENGTH
    assert config_of("llama-head80")["head_dim"] == 80

    # Same model_type and shapes, same weights: llama-bf16 is llama cast to bfloat16.
    config_of("llama")
    config_of("llama-bf16")
    full = load_file(tmp_path / "llama" / "model.safetensors")
    half = load_file(tmp_path / "llama-bf16" / "model.safetensors")
    assert full.keys() == half.keys()
    for name, tensor in half.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, full[name].to(torch.bfloat16)), name
