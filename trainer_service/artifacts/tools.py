"""The work of merges and exports, run in child processes (torch, peft and llama.cpp stay out
of the trainer server, and a crash in native code cannot take it down).

    python -m trainer_service.artifacts.tools probe CONVERTER_DIR ARCHITECTURE
    python -m trainer_service.artifacts.tools merge BASE_DIR ADAPTER_DIR OUT_DIR
    python -m trainer_service.artifacts.tools quantize SOURCE.gguf TARGET.gguf TYPE

Each prints one JSON object on its last stdout line; a failure exits non-zero with the
reason on stderr.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def probe(converter_dir: Path, architecture: str) -> dict[str, Any]:
    """Whether llama.cpp's converter has a model class for `architecture`.

    Asks the converter's own registry: `conversion.get_model_class` imports the module the
    converter maps the architecture to and returns the class registered with
    `@ModelBase.register(...)`; an architecture it does not map raises NotImplementedError.
    """
    sys.path.insert(0, str(converter_dir / "gguf-py"))
    sys.path.insert(0, str(converter_dir))
    import conversion  # the converter's package, from the llama.cpp sources

    known = sorted(conversion.TEXT_MODEL_MAP)
    try:
        model_class = conversion.get_model_class(architecture)
    except NotImplementedError:
        return {"supported": False, "known": len(known)}
    except Exception as exc:  # the converter maps it but its module does not import here
        return {"supported": False, "known": len(known), "error": f"{type(exc).__name__}: {exc}"}
    return {"supported": True, "known": len(known), "model_class": model_class.__name__}


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Merge a peft LoRA adapter into its base (`merge_and_unload`) and save the result.

    The merge is computed in float32 and saved in the base's dtype as safetensors, with the
    base's config and generation config and the tokenizer (the adapter's when training saved
    one next to it, else the base's).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    declared = config.get("dtype") or config.get("torch_dtype") or "float32"
    saved_dtype = getattr(torch, declared) if isinstance(declared, str) and hasattr(torch, declared) else None
    if not isinstance(saved_dtype, torch.dtype):
        saved_dtype = torch.float32
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    merged = model.merge_and_unload(safe_merge=True)
    if saved_dtype != torch.float32:
        merged = merged.to(saved_dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(str(out_dir))
    for name in ("chat_template.jinja",):  # keep a separate template file as the source had it
        source = tokenizer_source / name
        if source.is_file() and not (out_dir / name).is_file():
            shutil.copyfile(source, out_dir / name)
    parameters = sum(p.numel() for p in merged.parameters())
    return {"parameters": parameters, "dtype": str(saved_dtype).removeprefix("torch.")}


def quantize(source: Path, target: Path, file_type: str) -> dict[str, Any]:
    """Quantize a GGUF file with llama.cpp's quantizer (`llama_model_quantize`)."""
    import ctypes
    import os

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type.upper()}")
    params.nthread = max(1, len(os.sched_getaffinity(0)))
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if code != 0 or not target.is_file():
        raise RuntimeError(f"llama_model_quantize returned {code}")
    return {"bytes": target.stat().st_size}


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "probe":
        result = probe(Path(args[0]), args[1])
    elif command == "merge":
        result = merge(Path(args[0]), Path(args[1]), Path(args[2]))
    elif command == "quantize":
        result = quantize(Path(args[0]), Path(args[1]), args[2])
    else:
        print(f"unknown command {command!r}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
