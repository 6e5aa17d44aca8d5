"""`modelyard models merge` and `modelyard models export`: run on a trainer, registered in the catalog."""

from __future__ import annotations

import argparse
from typing import Any

from clients.commands.common import TRAINER, HelpFormatter, options_parser, trainer_client
from clients.output import print_json
from modelyard.trainer.v1 import trainer_service_pb2 as pb

EXIT_OK = 0
LONG_CALL_SECONDS = 3600.0
"""Deadline of a merge or export when --timeout is not given: they answer when done."""


def register(commands: Any) -> None:
    """Add `merge` and `export` to the `models` sub-commands."""
    options = options_parser(TRAINER)
    merge = commands.add_parser(
        "merge",
        parents=[options],
        help="merge a LoRA adapter into its base (on a trainer)",
        formatter_class=HelpFormatter,
        description=(
            "Merge a LoRA adapter into its base model on a trainer (peft merge_and_unload) and\n"
            "register the merged model in the catalog, with the adapter as its parent. Refused\n"
            "before any work when llama.cpp's converter does not know the architecture.\n"
            "Prints the new model's name when it is READY."
        ),
        epilog=(
            "examples:\n"
            "  modelyard models merge tiny-llama-ft\n"
            "  modelyard models merge tiny-llama-ft --name tiny-llama-chat --json"
        ),
    )
    merge.add_argument("adapter", metavar="ADAPTER", help="adapter id or models/ID")
    merge.add_argument("--name", default="", help="id of the merged model (default: ADAPTER-merged)")
    merge.add_argument("--validate-only", action="store_true", help="check only; merge nothing")
    merge.set_defaults(func=merge_adapter)

    export = commands.add_parser(
        "export",
        parents=[options],
        help="export a model to GGUF (on a trainer)",
        formatter_class=HelpFormatter,
        description=(
            "Export a model to a GGUF file on a trainer with llama.cpp's own converter and\n"
            "quantizer, and register the file in the catalog with the model as its parent; a\n"
            "llama.cpp worker (or Ollama) serves it. f32, f16 and bf16 come from the converter,\n"
            "other types (q8_0, q4_k_m, q5_k_m, q6_k, ...) from llama.cpp's quantizer. Prints\n"
            "the new model's name when it is READY."
        ),
        epilog=(
            "examples:\n"
            "  modelyard models export tiny-llama-ft-merged --format gguf --quantization q8_0\n"
            "  modelyard models export tiny-llama --quantization q4_k_m --name tiny-llama-q4"
        ),
    )
    export.add_argument("model", metavar="MODEL", help="model id or models/ID")
    export.add_argument("--format", default="gguf", choices=["gguf"], help="output format (gguf)")
    export.add_argument(
        "--quantization", default="f16", metavar="TYPE", help="llama.cpp file type (default f16)"
    )
    export.add_argument("--name", default="", help="id of the exported model (default: MODEL-TYPE)")
    export.add_argument("--validate-only", action="store_true", help="check only; convert nothing")
    export.set_defaults(func=export_model)


def _report(model: str, args: argparse.Namespace, response: Any, what: str) -> int:
    if args.json:
        print_json(response)
    elif model:
        print(model)
    else:
        print(f"{what}: the checks passed (validate only)")
    return EXIT_OK


def merge_adapter(args: argparse.Namespace) -> int:
    """`models merge`."""
    with trainer_client(args) as client:
        model = client.merge_adapter(
            args.adapter,
            output_model_id=args.name,
            validate_only=args.validate_only,
            timeout=args.timeout or LONG_CALL_SECONDS,
        )
    return _report(model, args, pb.MergeAdapterResponse(model=model), "merge")


def export_model(args: argparse.Namespace) -> int:
    """`models export`."""
    with trainer_client(args) as client:
        model = client.export_model(
            args.model,
            quantization=args.quantization,
            output_model_id=args.name,
            validate_only=args.validate_only,
            timeout=args.timeout or LONG_CALL_SECONDS,
        )
    return _report(model, args, pb.ExportModelResponse(model=model), "export")
