"""Streamed chat through the Modelyard gateway vs vLLM's own OpenAI server, on the same model.

    .venv/bin/python benchmarks/gateway_stream.py [--concurrency 1,8] [--rounds 3] [--phases 2]
        [--max-tokens 64] [--hidden-size 256] [--layers 4] [--model DIR] [--enforce-eager]

Builds one tiny float32 Llama (or takes --model) and, in one run, serves it two ways, one
engine at a time (the machine is shared; two vLLM engines would also compete for it),
PHASES times each, alternating (gateway, vLLM, vLLM, gateway, ...):

1. the gateway: `python -m catalog_service`, `python -m inference_service` (vLLM, the
   engine arguments of one `InferenceSettings`) and `python -m gateway` as processes;
2. vLLM's OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`, as
   `vllm serve` runs one API server) with the same engine arguments
   (`inference_stream.VllmHttpServer`).

Both get the same requests: CONCURRENCY streamed `/v1/chat/completions` at once (greedy,
`top_p` 1, `ignore_eos`, MAX_TOKENS tokens, `stream_options.include_usage`) from aiohttp.
A round's tokens/s is all completion tokens (from the final usage chunks) over the round's
wall time; TTFT is the time to a stream's first content chunk. Before measuring, each
path answers one greedy chat, and the two answers must agree. Each phase starts its
servers afresh and runs ROUNDS rounds per concurrency; alternating the phases spreads
drifting machine load over both paths, but read the spread before the ratio, and rerun
when the machine is busy (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp  # a vLLM dependency

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from inference_engine import PROMPTS, RoundStats  # noqa: E402  (benchmarks/)
from inference_stream import (  # noqa: E402  (benchmarks/)
    SERVED_NAME,
    VllmHttpServer,
    machine,
    percentile,
    spread,
    timed_round,
    versions,
)

from clients.catalog import CatalogClient  # noqa: E402
from inference_service.settings import InferenceSettings  # noqa: E402
from tests.helpers import ServerProcess, free_port  # noqa: E402

PATHS = ("gateway", "vLLM HTTP")
CHECK_TOKENS = 16


def chat_payload(prompt: str, max_tokens: int, stream: bool) -> dict[str, object]:
    """A greedy chat request both servers read alike."""
    payload: dict[str, object] = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "top_p": 1.0,  # else each server applies generation_config.json's defaults its own way
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        payload["stream_options"] = {"include_usage": True}
    return payload


async def chat_round(
    session: aiohttp.ClientSession, url: str, concurrency: int, max_tokens: int
) -> RoundStats:
    """``concurrency`` streamed chats at once; 1 per content chunk, corrected by the final usage."""

    async def stream(i: int) -> AsyncIterator[int]:
        payload = chat_payload(PROMPTS[i % len(PROMPTS)], max_tokens, stream=True)
        counted = 0
        async with session.post(f"{url}/v1/chat/completions", json=payload) as response:
            response.raise_for_status()
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    yield int(chunk["usage"]["completion_tokens"]) - counted
                    continue
                if any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices", [])):
                    counted += 1
                    yield 1

    return await timed_round(concurrency, stream)


async def greedy_answer(session: aiohttp.ClientSession, url: str) -> str:
    async with session.post(
        f"{url}/v1/chat/completions", json=chat_payload(PROMPTS[0], CHECK_TOKENS, stream=False)
    ) as response:
        response.raise_for_status()
        return str((await response.json())["choices"][0]["message"]["content"])


async def wait_http(
    session: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    """Wait until ``url``/health answers 200; fail with the log when the process dies."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited: {log.read_text(errors='replace')[-4000:]}")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{url}/health") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} not ready")


@contextlib.contextmanager
def gateway_suite(
    tmp: Path, model: Path, settings: InferenceSettings
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Catalog, inference (vLLM) and gateway processes; yields the gateway's URL and process."""
    tmp.mkdir(parents=True, exist_ok=True)
    catalog = ServerProcess(
        "catalog_service",
        ["--data-dir", str(tmp / "catalog"), "--allowed-roots", str(model.parent), "--log-level", "WARNING"],
        log_path=tmp / "catalog.log",
    )
    processes = [catalog]
    gateway: subprocess.Popen[bytes] | None = None
    log = open(tmp / "gateway.log", "wb")  # noqa: SIM115 - closed below
    try:
        catalog.wait_serving(120)
        with CatalogClient(catalog.address) as client:
            client.import_model(str(model), model_id=SERVED_NAME)
        inference = ServerProcess(
            "inference_service",
            [
                "--data-dir",
                str(settings.data_dir),
                "--catalog-address",
                catalog.address,
                "--engine",
                "vllm",
                "--dtype",
                settings.dtype,
                "--kv-cache-memory-bytes",
                str(settings.kv_cache_memory_bytes),
                "--max-num-seqs",
                str(settings.max_num_seqs),
                "--log-level",
                "WARNING",
                "--max-concurrent-requests",
                "64",
                "--metrics-port",
                "0",
                "--enforce-eager" if settings.enforce_eager else "--no-enforce-eager",
            ],
            log_path=tmp / "inference.log",
        )
        processes.append(inference)
        inference.wait_serving(120)
        address = f"127.0.0.1:{free_port()}"
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--address", address, "--catalog-address", catalog.address,
             "--log-level", "WARNING"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        yield f"http://{address}", gateway
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        log.close()
        for process in reversed(processes):
            process.stop()


async def measure(
    session: aiohttp.ClientSession,
    url: str,
    path: str,
    concurrencies: list[int],
    rounds: int,
    max_tokens: int,
) -> dict[int, list[RoundStats]]:
    """Warm up, then ROUNDS rounds per concurrency; prints every round."""
    for concurrency in concurrencies:
        await chat_round(session, url, concurrency, 8)
    results: dict[int, list[RoundStats]] = {}
    for concurrency in concurrencies:
        results[concurrency] = []
        for r in range(rounds):
            stats = await chat_round(session, url, concurrency, max_tokens)
            if stats.tokens != concurrency * max_tokens:
                raise RuntimeError(
                    f"{path} produced {stats.tokens} tokens, expected {concurrency * max_tokens}"
                )
            results[concurrency].append(stats)
            print(
                f"  {path:<9} c{concurrency} round {r}: {stats.tokens_per_second:7.1f} tok/s  "
                f"ttft p50 {stats.ttft_p50 * 1000:6.0f} ms  p95 {percentile(stats.ttft, 95) * 1000:6.0f} ms"
            )
    return results


def report(concurrency: int, results: dict[str, dict[int, list[RoundStats]]], max_tokens: int) -> None:
    """One markdown table per concurrency: best round and median (spread) per path, and the ratio."""
    print(f"\n### {concurrency} concurrent stream{'s' if concurrency > 1 else ''} x {max_tokens} tokens\n")
    print(
        "| path | tokens/s best | tokens/s median (min-max) "
        "| TTFT p50 ms best | TTFT p50 ms median (min-max) |"
    )
    print("|---|---|---|---|---|")
    for path in PATHS:
        rounds = results[path][concurrency]
        rates = [r.tokens_per_second for r in rounds]
        ttft = [r.ttft_p50 * 1000 for r in rounds]
        print(
            f"| {path} | {max(rates):.0f} | {spread(rates, '{:.0f}')} "
            f"| {min(ttft):.0f} | {spread(ttft, '{:.0f}')} |"
        )
    best = {p: max(r.tokens_per_second for r in results[p][concurrency]) for p in PATHS}
    medians = {p: statistics.median(r.tokens_per_second for r in results[p][concurrency]) for p in PATHS}
    latency = {p: statistics.median(r.ttft_p50 for r in results[p][concurrency]) * 1000 for p in PATHS}
    print(
        f"\ngateway / vLLM HTTP tokens/s: best rounds {best['gateway'] / best['vLLM HTTP']:.2f}, "
        f"medians {medians['gateway'] / medians['vLLM HTTP']:.2f}; "
        f"TTFT p50 medians {latency['gateway']:.0f} vs {latency['vLLM HTTP']:.0f} ms"
    )


async def run(args: argparse.Namespace, tmp: Path, model: Path) -> None:
    settings = InferenceSettings(
        data_dir=tmp / "inference",
        engine="vllm",
        dtype=args.dtype,
        kv_cache_memory_bytes=args.kv_cache_bytes,
        max_num_seqs=args.max_num_seqs,
        enforce_eager=args.enforce_eager,
    )
    print(f"machine: {machine()}\n{versions()}")
    print(f"model: {model} (float32 weights, dtype {settings.dtype}); prompts: {len(PROMPTS)}")
    results: dict[str, dict[int, list[RoundStats]]] = {p: {c: [] for c in args.concurrency} for p in PATHS}
    answers: dict[str, str] = {}

    def add(path: str, measured: dict[int, list[RoundStats]]) -> None:
        for concurrency, rounds in measured.items():
            results[path][concurrency].extend(rounds)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        for phase in range(args.phases):
            order = PATHS if phase % 2 == 0 else PATHS[::-1]
            for path in order:
                print(f"\nphase {phase + 1}: {path}")
                if path == "gateway":
                    with gateway_suite(tmp / f"phase-{phase}", model, settings) as (url, gateway):
                        await wait_http(session, url, gateway, tmp / f"phase-{phase}" / "gateway.log")
                        started = time.perf_counter()
                        answers[path] = await greedy_answer(session, url)  # loads the model on first use
                        print(f"  first request (model load included): {time.perf_counter() - started:.0f} s")
                        add(
                            path,
                            await measure(session, url, path, args.concurrency, args.rounds, args.max_tokens),
                        )
                    continue
                http = VllmHttpServer(model, settings, tmp / f"vllm-http-{phase}.log")
                try:
                    await http.wait_ready(session)
                    answers[path] = await greedy_answer(session, http.url)
                    add(
                        path,
                        await measure(
                            session, http.url, path, args.concurrency, args.rounds, args.max_tokens
                        ),
                    )
                finally:
                    http.stop()
    agree = len(set(answers.values())) == 1
    print(f"\ngreedy answers of the two paths {'agree' if agree else 'DIFFER'}: {answers}")
    for concurrency in args.concurrency:
        report(concurrency, results, args.max_tokens)
    print(f"\nmachine at the end: {machine()}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="model folder (default: build a tiny Llama)")
    parser.add_argument("--hidden-size", type=int, default=256, help="of the built tiny Llama")
    parser.add_argument("--layers", type=int, default=4, help="of the built tiny Llama")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated stream counts")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per concurrency and phase")
    parser.add_argument(
        "--phases", type=int, default=2, help="times each path is started and measured, alternating"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-bytes", type=int, default=256 * 1024 * 1024)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without graph compilation")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="modelyard-gateway-bench-") as name:
        tmp = Path(name)
        model = args.model
        if model is None:
            from tinymodels.llm import build_llm

            model = build_llm(
                tmp / "models" / "tiny-llama", hidden_size=args.hidden_size, num_layers=args.layers
            )
        asyncio.run(run(args, tmp, model.resolve()))
    return 0


if __name__ == "__main__":  # vLLM spawns its EngineCore process: the guard is required
    sys.exit(main())
