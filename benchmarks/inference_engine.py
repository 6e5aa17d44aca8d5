"""Streaming throughput and time to first token of the engines, called in-process.

    .venv/bin/python benchmarks/inference_engine.py [--model DIR] [--engine vllm|transformers|both]
        [--concurrency 1,8] [--rounds 3] [--max-tokens 64] [--dtype float32]

Drives `Engine.generate` directly (no gRPC): CONCURRENCY streams at once, each a greedy
completion of MAX_TOKENS tokens (``ignore_eos``), ROUNDS times per concurrency level.
Prints every round (aggregate generated tokens/s, median and p90 time to first token)
and the median and spread of the rounds: on a shared 2-core machine single rounds are
noisy.  Without --model it builds the tiny Llama of the tests (seconds).  This is the
in-process baseline that a gRPC benchmark compares against; `stream_round` is reusable.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference_service.engines import Engine, EngineRequest, SamplingSpec, create_engine  # noqa: E402

PROMPTS = [
    "the cat runs to the river and",
    "a dog sees the red house",
    "my friend reads a good book about",
    "the engineer builds a small boat for",
]


@dataclass(frozen=True)
class RoundStats:
    """One round: every stream's time to first token and the aggregate throughput."""

    concurrency: int
    seconds: float
    tokens: int
    ttft: list[float]

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second, all streams together."""
        return self.tokens / self.seconds

    @property
    def ttft_p50(self) -> float:
        """Median time to first token (s)."""
        return statistics.median(self.ttft)

    @property
    def ttft_p90(self) -> float:
        """90th percentile time to first token (s)."""
        ordered = sorted(self.ttft)
        return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


async def stream_round(engine: Engine, concurrency: int, max_tokens: int, tag: str) -> RoundStats:
    """Run ``concurrency`` greedy streams at once through ``engine`` and time them."""
    sampling = SamplingSpec(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    async def one(i: int) -> tuple[float, int]:
        request = EngineRequest(f"{tag}-{i}", prompt=PROMPTS[i % len(PROMPTS)], sampling=sampling)
        started = time.perf_counter()
        first: float | None = None
        tokens = 0
        async for delta in engine.generate(request):
            if delta.token_ids and first is None:
                first = time.perf_counter() - started
            tokens += len(delta.token_ids)
        return (first if first is not None else time.perf_counter() - started), tokens

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(concurrency)))
    seconds = time.perf_counter() - started
    return RoundStats(concurrency, seconds, sum(t for _, t in results), [f for f, _ in results])


async def bench_engine(name: str, model: Path, args: argparse.Namespace) -> None:
    options: dict[str, object] = {"dtype": args.dtype}
    if name == "vllm":
        options |= {"kv_cache_memory_bytes": args.kv_cache_bytes, "enable_lora": False}
    engine = create_engine(name, model, **options)
    started = time.perf_counter()
    await engine.start()
    print(f"\n{name} {engine.version}: started in {time.perf_counter() - started:.1f}s")
    try:
        for concurrency in args.concurrency:  # warm every batch shape up first
            await stream_round(engine, concurrency, 8, f"{name}-warmup-{concurrency}")
        for concurrency in args.concurrency:
            rounds = []
            for r in range(args.rounds):
                stats = await stream_round(engine, concurrency, args.max_tokens, f"{name}-{concurrency}-{r}")
                rounds.append(stats)
                print(
                    f"  c={concurrency:<3} round {r}: {stats.tokens_per_second:8.1f} tok/s  "
                    f"ttft p50 {stats.ttft_p50 * 1000:7.1f} ms  p90 {stats.ttft_p90 * 1000:7.1f} ms"
                )
            rates = [s.tokens_per_second for s in rounds]
            ttfts = [s.ttft_p50 * 1000 for s in rounds]
            print(
                f"  c={concurrency:<3} median  : {statistics.median(rates):8.1f} tok/s "
                f"(spread {min(rates):.1f}-{max(rates):.1f})  "
                f"ttft p50 {statistics.median(ttfts):7.1f} ms (spread {min(ttfts):.1f}-{max(ttfts):.1f})"
            )
    finally:
        await engine.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="model folder (default: build the tiny test Llama)")
    parser.add_argument("--engine", choices=["vllm", "transformers", "both"], default="both")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated stream counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-bytes", type=int, default=256 * 1024 * 1024)
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from tinymodels.llm import build_llm

            model = build_llm(Path(tmp) / "tiny-llama")
        engines = ["vllm", "transformers"] if args.engine == "both" else [args.engine]
        for name in engines:
            await bench_engine(name, model, args)


if __name__ == "__main__":  # vLLM spawns its EngineCore process: the guard is required
    asyncio.run(main())
