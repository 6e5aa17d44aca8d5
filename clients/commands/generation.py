"""`modelyard generate MODEL PROMPT`, `modelyard chat MODEL` and `modelyard embed MODEL TEXT...`.

All are routed through the catalog (`FindWorkers`, with fail-over to the
next worker when one is unavailable) unless an inference address is given
with `--inference` or `MODELYARD_INFERENCE_ADDRESS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any

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
from clients.inference import InferenceClient
from clients.output import enum_label, print_json, print_json_line
from clients.routing import RoutedInferenceClient
from modelyard.inference.v1 import inference_service_pb2 as pb

DEFAULT_GENERATION_TIMEOUT = 300.0
EXIT_COMMANDS = ("/exit", "/quit")


Generator = InferenceClient | RoutedInferenceClient
"""A direct or a routed inference client: the same generation methods."""


def _sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (unset: the model's generation_config, else the engine's)")
    group.add_argument("--max-tokens", type=int, help="most tokens to generate")
    group.add_argument("--temperature", type=float, help="temperature; 0 is greedy")
    group.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1]")
    group.add_argument("--top-k", type=int, help="top-k sampling")
    group.add_argument("--seed", type=int, help="seed for reproducible sampling")
    group.add_argument("--stop", action="append", help="stop string (repeatable)")
    group.add_argument("--repetition-penalty", type=float, help="repetition penalty (1 is none)")


def register(sub: Subparsers) -> None:
    """Add `generate` and `chat`."""
    options = options_parser(CATALOG, INFERENCE)
    generate = sub.add_parser(
        "generate",
        parents=[options],
        help="generate text from a prompt",
        formatter_class=HelpFormatter,
        description=(
            "Generate a completion of PROMPT with MODEL (a catalog model). The request goes to the\n"
            "best worker the catalog finds for the model (or adapter), failing over to the next one\n"
            "when a worker is unavailable; --inference ADDRESS calls that server directly.\n"
            "The text goes to stdout; token counts and the worker to stderr. PROMPT - reads stdin."
        ),
        epilog=(
            "examples:\n"
            '  modelyard generate tiny-llama "Once upon a time" --max-tokens 32 --stream\n'
            '  modelyard generate tiny-llama "Hello" --adapter tiny-llama-ft --temperature 0 --json'
        ),
    )
    generate.add_argument("model", metavar="MODEL", help="catalog model id or models/ID")
    generate.add_argument("prompt", metavar="PROMPT", help="the prompt; - reads it from stdin")
    generate.add_argument("--adapter", help="LoRA adapter (catalog id) to apply")
    generate.add_argument(
        "--n", type=int, help="number of completions (streamed: only the first is printed, all with --json)"
    )
    generate.add_argument("--stream", action="store_true", help="print the text as it is generated")
    generate.add_argument("--request-id", help="request id to send (echoed by the server)")
    _sampling_arguments(generate)
    generate.set_defaults(func=generate_text)

    chat = sub.add_parser(
        "chat",
        parents=[options],
        help="chat with a model (interactive)",
        formatter_class=HelpFormatter,
        description=(
            "Chat with MODEL: each line read from stdin is a user message, answered with the\n"
            "model's chat template, streamed as it is generated. Ends at end of input or /exit;\n"
            "/reset forgets the conversation. Works with piped input too (one message per line).\n"
            "--json prints one ChatResponse per line instead (no streaming)."
        ),
        epilog=(
            "examples:\n"
            "  modelyard chat tiny-llama --system 'You are terse.'\n"
            "  printf 'hi\\nhow are you?\\n' | modelyard chat tiny-llama --max-tokens 16"
        ),
    )
    chat.add_argument("model", metavar="MODEL", help="catalog model id or models/ID")
    chat.add_argument("--adapter", help="LoRA adapter (catalog id) to apply")
    chat.add_argument("--system", help="system message that starts the conversation")
    _sampling_arguments(chat)
    chat.set_defaults(func=chat_loop)

    embed = sub.add_parser(
        "embed",
        parents=[options],
        help="embed texts as vectors",
        formatter_class=HelpFormatter,
        description=(
            "Embed each TEXT with MODEL (a catalog model, or an adapter run on its base): one\n"
            "vector per text, the mean of the model's last hidden states, scaled to unit length.\n"
            "Routed to a worker that can embed (a vLLM-served model is embedded by the worker's\n"
            "transformers engine). Prints one JSON array per line (--json: the EmbedResponse);\n"
            "token counts and the worker go to stderr; TEXT - reads one text per line from stdin."
        ),
        epilog=(
            "examples:\n"
            "  modelyard embed tiny-llama 'a cat' 'a dog'\n"
            "  modelyard embed tiny-llama 'hello' --no-normalize --json"
        ),
    )
    embed.add_argument("model", metavar="MODEL", help="catalog model id or models/ID")
    embed.add_argument(
        "texts", metavar="TEXT", nargs="+", help="a text to embed; - reads stdin, one text per line"
    )
    embed.add_argument(
        "--no-normalize", dest="normalize", action="store_false", help="keep the raw mean (not unit length)"
    )
    embed.add_argument("--request-id", help="request id to send (echoed by the server)")
    embed.set_defaults(func=embed_texts)


def _generator(args: argparse.Namespace) -> Generator:
    if address_given(args, INFERENCE):
        return inference_client(args)
    return RoutedInferenceClient(address(args, CATALOG), **client_kwargs(args))


def _where(client: Generator) -> str:
    if isinstance(client, RoutedInferenceClient):
        return client.last_address or "?"
    return getattr(client, "address", "?")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "repetition_penalty": args.repetition_penalty,
        "n": getattr(args, "n", None),
        "timeout": args.timeout or DEFAULT_GENERATION_TIMEOUT,
    }


def _usage_text(usage: pb.Usage, finish: int, where: str) -> str:
    reason = enum_label(pb.FinishReason.DESCRIPTOR, finish).lower()
    return (
        f"[{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens, "
        f"finish {reason}, worker {where}]"
    )


def generate_text(args: argparse.Namespace) -> int:
    """`generate`."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    client = _generator(args)
    try:
        kwargs = {**_sampling(args), "adapter": args.adapter, "request_id": args.request_id}
        if args.stream:
            finish = 0
            usage = pb.Usage()
            for delta in client.stream_generate(args.model, prompt, **kwargs):
                if args.json:
                    print_json_line(delta)
                    continue
                if delta.index != 0:
                    continue  # with --n, the text of the first completion only (all with --json)
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                finish = delta.finish_reason or finish
                if delta.HasField("usage"):
                    usage = delta.usage
            if not args.json:
                print()
                print(_usage_text(usage, finish, _where(client)), file=sys.stderr)
            return 0
        response = client.generate(args.model, prompt, **kwargs)
    finally:
        client.close()
    if args.json:
        print_json(response)
        return 0
    many = len(response.completions) > 1
    for completion in response.completions:
        print(f"[{completion.index}] {completion.text}" if many else completion.text)
    finish = response.completions[0].finish_reason if response.completions else 0
    print(_usage_text(response.usage, finish, _where(client)), file=sys.stderr)
    return 0


def embed_texts(args: argparse.Namespace) -> int:
    """`embed`."""
    texts: list[str] = []
    for text in args.texts:
        texts.extend(sys.stdin.read().splitlines() if text == "-" else [text])
    client = _generator(args)
    try:
        response = client.embed(
            args.model,
            texts,
            normalize=args.normalize,
            request_id=args.request_id,
            timeout=args.timeout or DEFAULT_GENERATION_TIMEOUT,
        )
    finally:
        client.close()
    if args.json:
        print_json(response)
        return 0
    for embedding in response.embeddings:
        print(json.dumps([round(value, 6) for value in embedding.values]))
    dimensions = len(response.embeddings[0].values) if response.embeddings else 0
    print(
        f"[{len(response.embeddings)} vectors of {dimensions} dimensions, "
        f"{response.usage.prompt_tokens} tokens, worker {_where(client)}]",
        file=sys.stderr,
    )
    return 0


def _lines() -> Iterator[str]:
    """User messages: prompted lines on a terminal, plain lines otherwise."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return
        else:
            raw = sys.stdin.readline()
            if not raw:
                return
            line = raw.rstrip("\n")
        yield line


def chat_loop(args: argparse.Namespace) -> int:
    """`chat`: one answer per line of input."""
    system = [pb.ChatMessage(role="system", content=args.system)] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    client = _generator(args)
    try:
        kwargs = {**_sampling(args), "adapter": args.adapter}
        for line in _lines():
            text = line.strip()
            if not text:
                continue
            if text in EXIT_COMMANDS:
                break
            if text == "/reset":
                messages = list(system)
                continue
            messages.append(pb.ChatMessage(role="user", content=line))
            if args.json:
                response = client.chat(args.model, messages, **kwargs)
                print_json_line(response)
                answer = response.choices[0].message.content if response.choices else ""
            else:
                if interactive:
                    sys.stdout.write("assistant> ")
                parts = []
                for delta in client.stream_chat(args.model, messages, **kwargs):
                    if delta.index != 0:
                        continue
                    parts.append(delta.content)
                    sys.stdout.write(delta.content)
                    sys.stdout.flush()
                print()
                answer = "".join(parts)
            messages.append(pb.ChatMessage(role="assistant", content=answer))
    finally:
        client.close()
    return 0
