"""A bounded load generator over raw asyncio stubs (no client retries: every status counts).

`run_load` drives one RPC with N concurrent asyncio clients for a fixed time and counts
OK answers, RESOURCE_EXHAUSTED (the documented back-pressure; the client then backs off
briefly, as a real one would) and any other status, with the latencies of the OK calls.
Used by `benchmarks/load_test.py` and, briefly, by `tests/reliability/test_load.py`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc import aio

from modelyard.catalog.v1 import catalog_service_pb2, catalog_service_pb2_grpc
from modelyard.inference.v1 import inference_service_pb2, inference_service_pb2_grpc

CALL_TIMEOUT = 60.0
"""Deadline of each call: a stuck server shows up as DEADLINE_EXCEEDED, never as a hung test."""
BACKOFF_SECONDS = 0.02
"""Pause of a client after RESOURCE_EXHAUSTED."""

Call = Callable[[], Awaitable[object]]


@dataclass
class LoadResult:
    """What one RPC answered under load."""

    name: str
    clients: int
    seconds: float = 0.0
    ok: int = 0
    exhausted: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)
    """Seconds per OK call."""

    @property
    def other_errors(self) -> int:
        """Answers that were neither OK nor RESOURCE_EXHAUSTED."""
        return sum(self.errors.values())

    def percentile_ms(self, percent: float) -> float:
        """Latency percentile of the OK calls in milliseconds (nearest rank; 0 without calls)."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        rank = max(0, min(len(ordered) - 1, round(percent / 100 * len(ordered) + 0.5) - 1))
        return ordered[rank] * 1e3


async def run_load(name: str, call: Call, *, clients: int, seconds: float) -> LoadResult:
    """Run `call` from `clients` concurrent loops for `seconds` (plus at most one call's deadline)."""
    result = LoadResult(name, clients)
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + seconds

    async def client() -> None:
        while loop.time() < deadline:
            begun = time.perf_counter()
            try:
                await call()
            except aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    result.exhausted += 1
                    await asyncio.sleep(BACKOFF_SECONDS)
                else:
                    result.errors[error.code().name] += 1
                    result.first_error = result.first_error or f"{error.code().name}: {error.details()}"
                continue
            result.latencies.append(time.perf_counter() - begun)
            result.ok += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    result.seconds = loop.time() - started
    return result


def catalog_calls(channel: aio.Channel, model_ids: Sequence[str]) -> dict[str, Call]:
    """GetModel of a random entry of `model_ids`, and ListModels pages of 50."""
    stub = catalog_service_pb2_grpc.CatalogServiceStub(channel)

    async def get_model() -> object:
        name = f"models/{random.choice(model_ids)}"
        return await stub.GetModel(catalog_service_pb2.GetModelRequest(name=name), timeout=CALL_TIMEOUT)

    async def list_models() -> object:
        request = catalog_service_pb2.ListModelsRequest(page_size=50)
        return await stub.ListModels(request, timeout=CALL_TIMEOUT)

    return {"catalog GetModel": get_model, "catalog ListModels": list_models}


def inference_calls(channel: aio.Channel, model: str, max_tokens: int = 16) -> dict[str, Call]:
    """Generate and StreamGenerate (read to its end) of `max_tokens` tokens from `model`."""
    stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
    sampling = inference_service_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    async def generate() -> object:
        request = inference_service_pb2.GenerateRequest(model=model, prompt="hello there", sampling=sampling)
        reply = await stub.Generate(request, timeout=CALL_TIMEOUT)
        assert len(reply.completions[0].token_ids) == max_tokens, reply
        return reply

    async def stream_generate() -> object:
        request = inference_service_pb2.StreamGenerateRequest(
            model=model, prompt="stream it", sampling=sampling
        )
        tokens = 0
        async for delta in stub.StreamGenerate(request, timeout=CALL_TIMEOUT):
            tokens += len(delta.token_ids)
        assert tokens == max_tokens, tokens
        return tokens

    return {"inference Generate": generate, "inference StreamGenerate": stream_generate}


def format_table(results: Sequence[LoadResult]) -> str:
    """The results as a text table: counts, rate and latency percentiles."""
    header = (
        f"{'rpc':<26} {'clients':>7} {'ok':>7} {'exhausted':>9} {'errors':>6} {'ok/s':>8} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.name:<26} {r.clients:>7} {r.ok:>7} {r.exhausted:>9} {r.other_errors:>6} "
            f"{r.ok / r.seconds if r.seconds else 0:>8.1f} {r.percentile_ms(50):>8.1f} "
            f"{r.percentile_ms(95):>8.1f} {r.percentile_ms(99):>8.1f}"
        )
    return "\n".join(lines)
