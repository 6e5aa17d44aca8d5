"""`modelyard generate-image MODEL PROMPT -o out.png`.

Routed through the catalog like `generate`: the request goes to the best worker the
catalog finds for MODEL (a `diffusers` inference worker), failing over to the next one
when a worker is unavailable, unless `--inference ADDRESS` (or
`MODELYARD_INFERENCE_ADDRESS`) names the server to call.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import grpc

from clients.commands.common import (
    CATALOG,
    INFERENCE,
    HelpFormatter,
    Subparsers,
    address,
    address_given,
    client_kwargs,
    inference_client,
    options_parser,
)
from clients.errors import ModelyardRpcError
from clients.inference import InferenceClient
from clients.output import print_json
from clients.routing import RoutedInferenceClient
from modelyard.inference.v1 import inference_service_pb2 as pb

DEFAULT_IMAGE_TIMEOUT = 600.0
"""Deadline of one image request when --timeout is not given (a first request loads the model)."""


def register(sub: Subparsers) -> None:
    """Add `generate-image`."""
    parser = sub.add_parser(
        "generate-image",
        parents=[options_parser(CATALOG, INFERENCE)],
        help="generate an image from a prompt (diffusers workers)",
        formatter_class=HelpFormatter,
        description=(
            "Generate one image of PROMPT with the image model MODEL (a catalog model) and write it\n"
            "as PNG to --output. The request goes to the best worker the catalog finds for the model\n"
            "(a diffusers worker), failing over to the next one when a worker is unavailable;\n"
            "--inference ADDRESS calls that server directly. Unset options take the defaults of the\n"
            "model's ImageConfig, else the pipeline's; the parameters used go to stderr (and are\n"
            "written into the PNG's `parameters` text chunk)."
        ),
        epilog=(
            "examples:\n"
            '  modelyard generate-image sd15 "a photo of a cat" -o cat.png --seed 1 --steps 20\n'
            '  modelyard generate-image sdxl "a castle" -o castle.png --adapter sdxl-style-lora \\\n'
            "      --negative blurry --width 1024 --height 768 --sampler DPMSolverMultistepScheduler"
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="catalog image model id or models/ID")
    parser.add_argument("prompt", metavar="PROMPT", help="what the image shows; - reads it from stdin")
    parser.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="where to write the PNG (- for stdout)"
    )
    parser.add_argument("--negative", metavar="TEXT", help="negative prompt: what the image should not show")
    parser.add_argument(
        "--adapter", metavar="LORA", help="image LoRA (catalog id) of the model's base family"
    )
    parser.add_argument("--adapter-scale", type=float, metavar="X", help="LoRA strength (default 1.0)")
    parser.add_argument("--steps", type=int, help="denoising steps")
    parser.add_argument("--cfg-scale", type=float, metavar="X", help="classifier-free guidance scale")
    parser.add_argument("--sampler", help="diffusers scheduler class, e.g. EulerDiscreteScheduler")
    parser.add_argument("--seed", type=int, help="seed: the same seed and options give the same image")
    parser.add_argument("--width", type=int, help="width in pixels (a multiple of 8)")
    parser.add_argument("--height", type=int, help="height in pixels (a multiple of 8)")
    parser.add_argument(
        "--clip-skip", type=int, metavar="N", help="1 uses the last text-encoder layer, 2 the one before"
    )
    parser.add_argument("--request-id", help="request id to send (echoed by the server)")
    parser.set_defaults(func=generate_image)


def _routed(
    routed: RoutedInferenceClient, model: str, call: Callable[[InferenceClient], pb.GenerateImageResponse]
) -> tuple[pb.GenerateImageResponse, str]:
    """`call` on the best worker for `model`, the next one when a worker is UNAVAILABLE."""
    last_error: ModelyardRpcError | None = None
    tried: set[str] = set()
    for refresh in (False, True):
        for worker in routed.addresses(model, refresh=refresh):
            if worker in tried:
                continue
            tried.add(worker)
            try:
                return call(routed.client(worker)), worker
            except ModelyardRpcError as error:
                if error.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                last_error = error
                routed.routes.forget(model, worker)
    assert last_error is not None
    raise last_error


def generate_image(args: argparse.Namespace) -> int:
    """`generate-image`."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    options = {
        "negative_prompt": args.negative,
        "adapter_scale": args.adapter_scale,
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "sampler": args.sampler,
        "seed": args.seed,
        "width": args.width,
        "height": args.height,
        "clip_skip": args.clip_skip,
        "request_id": args.request_id,
    }
    timeout = args.timeout or DEFAULT_IMAGE_TIMEOUT

    def call(client: InferenceClient) -> pb.GenerateImageResponse:
        return client.generate_image(args.model, prompt, adapter=args.adapter, timeout=timeout, **options)

    if address_given(args, INFERENCE):
        with inference_client(args) as direct:
            response, worker = call(direct), direct.address
    else:
        with RoutedInferenceClient(address(args, CATALOG), **client_kwargs(args)) as routed:
            response, worker = _routed(routed, args.model, call)

    if args.output == "-":
        sys.stdout.buffer.write(response.image)
        sys.stdout.buffer.flush()
    else:
        Path(args.output).expanduser().write_bytes(response.image)
    if args.json:
        shown = pb.GenerateImageResponse()
        shown.CopyFrom(response)
        shown.ClearField("image")  # the picture is in the file, not in the JSON
        print_json(shown, file=sys.stderr if args.output == "-" else sys.stdout)
        return 0
    used = response.parameters
    lora = f", LoRA {used.adapter} x{used.adapter_scale:g}" if used.adapter else ""
    target = "stdout" if args.output == "-" else args.output
    print(
        f"[{used.width}x{used.height}, seed {used.seed}, {used.steps} steps, {used.sampler}, "
        f"CFG {used.cfg_scale:g}, clip skip {used.clip_skip}{lora}, worker {worker}] wrote {target}",
        file=sys.stderr,
    )
    return 0
