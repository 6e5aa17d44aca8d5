"""A tiny but complete llama GGUF file, written with the ``gguf`` package.

The file is a faithful llama.cpp-style conversion of a tiny ``LlamaForCausalLM`` (the same
weights :func:`tinymodels.llm.build_llm` makes with the same seed and shape): llama.cpp
tensor names (``token_embd.weight``, ``blk.N.attn_q.weight`` ...), the q/k row permutation
llama.cpp applies, full llama metadata and a byte-level BPE tokenizer
(``tokenizer.ggml.model = "gpt2"``) with the ChatML chat template.  transformers loads it
with ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` and
``AutoTokenizer.from_pretrained(folder, gguf_file=name)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tinymodels.tokenizer import BOS_ID, CHAT_TEMPLATE, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID

TensorType = Literal["f32", "f16", "q8_0"]


def _permute_qk(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's ``permute`` of q/k projection rows (HF rotary layout -> GGUF layout)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _gguf_tensor_name(hf_name: str) -> str:
    """Map a transformers Llama parameter name to its llama.cpp GGUF tensor name."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module>.<sub>.weight
    if parts[:2] != ["model", "layers"]:
        raise KeyError(hf_name)
    layer = parts[2]
    module = ".".join(parts[3:-1])
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    return f"blk.{layer}.{per_layer[module]}.{parts[-1]}"


def _default_file_type(tensor_type: TensorType) -> int:
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[tensor_type]


def build_gguf(
    path: str | Path,
    arch: Literal["llama"] = "llama",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    context_length: int = 256,
    tensor_type: TensorType = "f16",
    file_type: int | None = None,
    name: str = "tiny-llama",
    chat_template: str | None = CHAT_TEMPLATE,
    source_dir: str | Path | None = None,
) -> Path:
    """Write a small, complete llama GGUF file to ``path`` and return ``path``.

    Metadata: ``general.architecture = "llama"``, ``general.name``, ``general.file_type``,
    ``llama.context_length``, ``llama.embedding_length``, ``llama.block_count``,
    ``llama.feed_forward_length``, ``llama.attention.head_count(_kv)``,
    ``llama.rope.dimension_count``, ``llama.rope.freq_base``,
    ``llama.attention.layer_norm_rms_epsilon``, ``llama.vocab_size``,
    ``tokenizer.ggml.*`` (model ``"gpt2"``, tokens, token types, merges, special ids) and
    ``tokenizer.chat_template``.

    Args:
        path: output ``.gguf`` file (parent folders are created).
        arch: only ``"llama"`` is supported.
        seed, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
            vocab_size: the model, as in :func:`tinymodels.llm.build_llm` (same seed and shape
            give the same weights).  Ignored when ``source_dir`` is given.
        context_length: ``llama.context_length`` (= max_position_embeddings).
        tensor_type: storage of the 2-D weights: ``"f32"``, ``"f16"`` or ``"q8_0"`` (real
            Q8_0 blocks; needs row sizes that are multiples of 32).  Norms are always F32.
        file_type: value for ``general.file_type`` (a ``gguf.LlamaFileType``); defaults to
            the one matching ``tensor_type``.  Pass e.g. ``LlamaFileType.MOSTLY_Q4_K_M`` to
            make the file *claim* another quantization (the tensors stay ``tensor_type``).
        name: ``general.name``.
        chat_template: ``tokenizer.chat_template``; ``None`` leaves it out.
        source_dir: convert this :func:`~tinymodels.llm.build_llm` llama folder instead of
            building a model in memory.
    """
    import gguf
    import torch

    if arch != "llama":
        raise ValueError(f"only arch='llama' is supported, got {arch!r}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)

    model, tokenizer = _load_or_make(
        source_dir,
        seed=seed,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        context_length=context_length,
    )
    config = model.config
    if config.model_type != "llama":
        raise ValueError(f"source model is {config.model_type!r}, expected 'llama'")
    n_head: int = config.num_attention_heads
    n_head_kv: int = config.num_key_value_heads
    head_dim: int = config.hidden_size // n_head
    rope_params = getattr(config, "rope_parameters", None) or {}
    rope_theta = float(rope_params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(name)
    writer.add_file_type(int(file_type) if file_type is not None else int(_default_file_type(tensor_type)))
    writer.add_context_length(int(context_length if source_dir is None else config.max_position_embeddings))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)

    _add_tokenizer(writer, tokenizer, chat_template)

    state = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    if "lm_head.weight" in state and getattr(config, "tie_word_embeddings", False):
        del state["lm_head.weight"]  # llama.cpp omits output.weight for tied embeddings
    for hf_name, array in state.items():
        if hf_name.endswith("self_attn.q_proj.weight"):
            array = _permute_qk(array, n_head, n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            array = _permute_qk(array, n_head, n_head_kv)
        _add_tensor(writer, _gguf_tensor_name(hf_name), np.ascontiguousarray(array), tensor_type)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _load_or_make(source_dir: str | Path | None, **shape: Any):
    """Return ``(model, tokenizer)``: loaded from ``source_dir`` or built in memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinymodels.llm import make_llm
    from tinymodels.tokenizer import make_tokenizer

    if source_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(str(source_dir), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
        return model, tokenizer
    tokenizer = make_tokenizer(vocab_size=shape.pop("vocab_size"), seed=shape["seed"])
    model = make_llm(
        "llama",
        seed=shape.pop("seed"),
        vocab_size=len(tokenizer),
        max_position_embeddings=shape.pop("context_length"),
        **shape,
    )
    return model, tokenizer


def _add_tokenizer(writer, tokenizer, chat_template: str | None) -> None:
    """Describe the byte-level BPE tokenizer in ``tokenizer.ggml.*`` keys."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = backend["model"]["vocab"]
    for added in backend.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [""] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    special = set(SPECIAL_TOKENS)
    token_types = [
        int(gguf.TokenType.CONTROL) if token in special else int(gguf.TokenType.NORMAL) for token in tokens
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _add_tensor(writer, name: str, array: np.ndarray, tensor_type: TensorType) -> None:
    import gguf

    if array.ndim == 1 or tensor_type == "f32":
        writer.add_tensor(name, array.astype(np.float32))
    elif tensor_type == "f16":
        writer.add_tensor(name, array.astype(np.float16))
    elif tensor_type == "q8_0":
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)
    else:
        raise ValueError(f"unknown tensor_type {tensor_type!r}")
