"""Command line: ``python -m tinymodels <kind> OUT [options]``.

Examples::

    python -m tinymodels tokenizer /tmp/tok
    python -m tinymodels llm /tmp/tiny-llama --arch llama
    python -m tinymodels lora /tmp/tiny-llama /tmp/tiny-lora --rank 8
    python -m tinymodels gguf /tmp/tiny.gguf --tensor-type f16
    python -m tinymodels hf-cache /tmp/hub --repo-id tiny-org/tiny-llama --src /tmp/tiny-llama
    python -m tinymodels sd15 /tmp/tiny-sd15
    python -m tinymodels sd-single-file /tmp/tiny-sdxl.safetensors --base sdxl
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tinymodels", description="Build tiny real models locally."
    )
    sub = parser.add_subparsers(dest="kind", required=True, metavar="KIND")

    p = sub.add_parser("tokenizer", help="byte-level BPE tokenizer with a ChatML chat template")
    p.add_argument("out", type=Path)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--separate-chat-template-file", action="store_true", help="write chat_template.jinja")

    p = sub.add_parser("llm", help="tiny causal LM (safetensors + tokenizer + generation config)")
    p.add_argument("out", type=Path)
    p.add_argument("--arch", choices=["llama", "qwen2", "gpt2", "mistral"], default="llama")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--max-position-embeddings", type=int, default=256)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--separate-chat-template-file", action="store_true")
    p.add_argument(
        "--tokenizer-style",
        choices=["byte_level", "llama"],
        default="byte_level",
        help="llama: byte-fallback BPE that llama.cpp's GGUF converter reads",
    )

    p = sub.add_parser("lora", help="peft LoRA adapter for a model made by 'llm'")
    p.add_argument("base", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-model-name", default=None, help="base_model_name_or_path (default: BASE)")

    p = sub.add_parser("gguf", help="llama GGUF file")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor-type", choices=["f32", "f16", "q8_0"], default="f16")
    p.add_argument("--file-type", default=None, help="claimed general.file_type, e.g. MOSTLY_Q4_K_M")
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--name", default="tiny-llama")
    p.add_argument("--source-dir", type=Path, default=None, help="convert this llama folder")

    p = sub.add_parser("hf-cache", help="hub cache entry (blobs/snapshots/refs) from a folder")
    p.add_argument("cache_root", type=Path)
    p.add_argument("--repo-id", default="tiny-org/tiny-llama")
    p.add_argument("--src", type=Path, required=True, help="folder with the repo files")
    p.add_argument("--revision-hash", default=None)

    for kind, text in (
        ("sd15", "tiny StableDiffusionPipeline folder"),
        ("sdxl", "tiny StableDiffusionXLPipeline folder"),
    ):
        p = sub.add_parser(kind, help=text)
        p.add_argument("out", type=Path)
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("sd-single-file", help="single-file (LDM layout) SD checkpoint")
    p.add_argument("out", type=Path)
    p.add_argument("--base", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pipeline-dir", type=Path, default=None)

    p = sub.add_parser("kohya-lora", help="kohya-ss LoRA with ss_* metadata")
    p.add_argument("out", type=Path)
    p.add_argument("--base", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("textual-inversion", help="A1111-style embedding")
    p.add_argument("out", type=Path)
    p.add_argument("--base", choices=["sd15", "sdxl"], default="sd15")

    p = sub.add_parser("vae", help="VAE-only single file (LDM layout)")
    p.add_argument("out", type=Path)
    p.add_argument("--base", choices=["sd15", "sdxl"], default="sd15")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints the path of what was built."""
    args = _parser().parse_args(argv)
    kind: str = args.kind
    result: Path
    if kind == "tokenizer":
        from tinymodels.tokenizer import build_tokenizer

        result = build_tokenizer(
            args.out,
            args.vocab_size,
            seed=args.seed,
            separate_chat_template_file=args.separate_chat_template_file,
        )
    elif kind == "llm":
        from tinymodels.llm import build_llm

        result = build_llm(
            args.out,
            args.arch,
            seed=args.seed,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            vocab_size=args.vocab_size,
            max_position_embeddings=args.max_position_embeddings,
            dtype=args.dtype,
            separate_chat_template_file=args.separate_chat_template_file,
            tokenizer_style=args.tokenizer_style,
        )
    elif kind == "lora":
        from tinymodels.llm import build_lora_adapter

        result = build_lora_adapter(
            args.base,
            args.out,
            r=args.rank,
            alpha=args.alpha,
            seed=args.seed,
            base_model_name=args.base_model_name,
        )
    elif kind == "gguf":
        import gguf

        from tinymodels.gguf_file import build_gguf

        file_type = None if args.file_type is None else int(gguf.LlamaFileType[args.file_type])
        result = build_gguf(
            args.out,
            seed=args.seed,
            tensor_type=args.tensor_type,
            file_type=file_type,
            context_length=args.context_length,
            name=args.name,
            source_dir=args.source_dir,
        )
    elif kind == "hf-cache":
        from tinymodels.hf_cache import build_hf_cache

        result = build_hf_cache(args.cache_root, args.repo_id, args.src, args.revision_hash)
    elif kind in ("sd15", "sdxl"):
        from tinymodels.diffusion import build_sd15_pipeline, build_sdxl_pipeline

        builder = build_sd15_pipeline if kind == "sd15" else build_sdxl_pipeline
        result = builder(args.out, seed=args.seed)
    elif kind == "sd-single-file":
        from tinymodels.diffusion import build_sd_single_file

        result = build_sd_single_file(args.out, args.base, seed=args.seed, pipeline_dir=args.pipeline_dir)
    elif kind == "kohya-lora":
        from tinymodels.diffusion import build_kohya_lora

        result = build_kohya_lora(args.out, args.base, rank=args.rank, seed=args.seed)
    elif kind == "textual-inversion":
        from tinymodels.diffusion import build_textual_inversion

        result = build_textual_inversion(args.out, args.base)
    elif kind == "vae":
        from tinymodels.diffusion import build_vae_only

        result = build_vae_only(args.out, args.base)
    else:  # pragma: no cover - argparse rejects unknown kinds
        raise AssertionError(kind)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
