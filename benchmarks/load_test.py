"""Bounded load test of the catalog and the inference server on loopback.

    .venv/bin/python benchmarks/load_test.py [--clients 32] [--seconds 10] [--rounds 3]
        [--engine vllm|transformers] [--max-concurrent 16] [--entries 1000] [--max-tokens 16]

Builds a tiny Llama, starts `python -m catalog_service` (SQLite, or --database-url) and
`python -m inference_service` as processes, imports and loads the model, fills the
catalog with ENTRIES entries, then drives each RPC -- catalog GetModel (random entry),
ListModels (pages of 50), inference Generate and StreamGenerate (MAX_TOKENS tokens) --
with CLIENTS concurrent asyncio clients for SECONDS, for ROUNDS rounds (machine noise
shows as the spread between rounds). It prints per RPC the OK answers, RESOURCE_EXHAUSTED
answers (the inference server's documented back-pressure beyond --max-concurrent
requests), any other status, OK calls per second and p50/p95/p99 latency, and the RSS of
each server process (with its children: vLLM's engine) after the warm-up and after each
round. Exit status 1 when any answer was neither OK nor RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from grpc import aio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients.catalog import CatalogClient  # noqa: E402
from modelyard.catalog.v1 import model_pb2  # noqa: E402
from tests.reliability.faults import rss_bytes  # noqa: E402
from tests.reliability.load import (  # noqa: E402
    LoadResult,
    catalog_calls,
    format_table,
    inference_calls,
    run_load,
)
from tests.reliability.stack import MODEL_ID, Stack  # noqa: E402
from tinymodels.llm import build_llm  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients per RPC")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per RPC and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all RPCs")
    parser.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    parser.add_argument("--max-concurrent", type=int, default=16, help="inference admission limit")
    parser.add_argument("--entries", type=int, default=1000, help="catalog entries to read from")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per generation")
    parser.add_argument("--database-url", default="", help="catalog database (default: SQLite)")
    return parser.parse_args()


def merged(results: list[LoadResult]) -> LoadResult:
    """One RPC's results of every round together."""
    total = LoadResult(results[0].name, results[0].clients)
    for result in results:
        total.seconds += result.seconds
        total.ok += result.ok
        total.exhausted += result.exhausted
        total.errors.update(result.errors)
        total.latencies.extend(result.latencies)
        total.first_error = total.first_error or result.first_error
    return total


def mib(value: int) -> str:
    return f"{value / 2**20:.0f} MiB"


async def drive(stack: Stack, args: argparse.Namespace, entries: list[str]) -> list[LoadResult]:
    assert stack.catalog is not None and stack.inference is not None
    pids = {"catalog": stack.catalog.proc.pid, "inference": stack.inference.proc.pid}
    rounds: list[list[LoadResult]] = []
    async with (
        aio.insecure_channel(stack.catalog_address) as catalog_channel,
        aio.insecure_channel(stack.inference_address) as inference_channel,
    ):
        calls = {
            **catalog_calls(catalog_channel, entries),
            **inference_calls(inference_channel, f"models/{MODEL_ID}", args.max_tokens),
        }
        for name, call in calls.items():  # warm-up: caches, connections, the engine's first batches
            await run_load(name, call, clients=args.clients, seconds=min(2.0, args.seconds))
        start_rss = {service: rss_bytes(pid) for service, pid in pids.items()}
        print("RSS after warm-up: " + ", ".join(f"{s} {mib(v)}" for s, v in start_rss.items()))
        for number in range(1, args.rounds + 1):
            results = [
                await run_load(name, call, clients=args.clients, seconds=args.seconds)
                for name, call in calls.items()
            ]
            rounds.append(results)
            rss = {service: rss_bytes(pid) for service, pid in pids.items()}
            print(f"\nround {number}")
            print(format_table(results))
            print(
                "RSS: "
                + ", ".join(f"{s} {mib(v)} ({(v - start_rss[s]) / 2**20:+.0f})" for s, v in rss.items())
            )
    totals = [merged([r[i] for r in rounds]) for i in range(len(calls))]
    print(f"\nall {args.rounds} rounds")
    print(format_table(totals))
    for result in totals:
        if result.other_errors:
            print(f"{result.name}: {dict(result.errors)}; first: {result.first_error}")
    return totals


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="modelyard-load-") as tmp:
        root = Path(tmp)
        model = build_llm(root / "models" / "tiny-llama", arch="llama")
        extra = {"MODELYARD_INFERENCE_ENGINE": args.engine, "MODELYARD_LOG_LEVEL": "WARNING"}
        if args.database_url:
            extra["MODELYARD_CATALOG_DATABASE_URL"] = args.database_url
        started = time.perf_counter()
        stack = Stack(root, model, max_concurrent_requests=args.max_concurrent, extra_env=extra)
        try:
            print(f"catalog and inference ({args.engine}) ready in {time.perf_counter() - started:.0f} s")
            entries = [f"load-{i:05d}" for i in range(args.entries)]
            with CatalogClient(stack.catalog_address) as catalog:
                for model_id in entries:
                    catalog.create_model(model_id, model_pb2.Model(display_name=model_id, tags=["load"]))
            print(
                f"{args.clients} clients x {args.seconds:g} s per RPC x {args.rounds} rounds; "
                f"inference admits {args.max_concurrent} requests at once"
            )
            totals = asyncio.run(drive(stack, args, entries))
        finally:
            stack.close()
    return 1 if any(result.other_errors for result in totals) else 0


if __name__ == "__main__":
    sys.exit(main())
