"""Catalog read throughput next to a no-op RPC on the same server.

    .venv/bin/python benchmarks/catalog_rpc.py [--entries 10000] [--seconds 5] [--concurrency 16]

Fills a fresh SQLite catalog (or --database-url) with ENTRIES model entries
(a realistic LlmConfig each), starts `python -m catalog_service` as its own
process, and drives it from this process with asyncio clients for a fixed time
per RPC: `grpc.health.v1.Health/Check` (the no-op), `GetModel` of random
entries, and `ListModels` pages of 100. Rounds alternate the RPCs so machine
noise hits all of them alike; it prints each round and the median ratios. Before the
rounds every entry is read once, so the numbers are the steady state (warm cache).
Target: GetModel >= 0.6 x the no-op.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from catalog_service.db import migrate  # noqa: E402
from catalog_service.store import CatalogStore  # noqa: E402
from modelyard.catalog.v1 import catalog_service_pb2, catalog_service_pb2_grpc, model_pb2  # noqa: E402
from tests.helpers import ServerProcess  # noqa: E402


def template() -> model_pb2.Model:
    model = model_pb2.Model(
        display_name="bench",
        author="bench-org",
        state=model_pb2.MODEL_STATE_READY,
        kind=model_pb2.MODEL_KIND_LLM,
        local_path="/models/bench",
        license="apache-2.0",
        tags=["chat", "bench"],
        labels={"team": "nlp"},
    )
    model.source.local.path = "/models/bench"
    llm = model.llm
    llm.architecture = "LlamaForCausalLM"
    llm.model_type = "llama"
    llm.compatible_model_types.extend(["llama"])
    llm.context_length = 8192
    llm.weight_format = model_pb2.WEIGHT_FORMAT_SAFETENSORS
    llm.dtype = "bfloat16"
    llm.parameter_count = 8_030_261_248
    llm.tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" * 8
    )
    for i in range(8):
        model.files.add(path=f"model-{i:05d}.safetensors", size_bytes=2_000_000_000, sha256="ab" * 32)
    return model


def fill(url: str, entries: int) -> None:
    migrate(url)
    store = CatalogStore(url, auto_migrate=False)
    base = template()
    started = time.perf_counter()
    for i in range(entries):
        store.create_model(f"bench-{i:05d}", base)
    store.close()
    print(f"filled {entries} entries in {time.perf_counter() - started:.1f} s")


async def drive(address: str, kind: str, seconds: float, concurrency: int, entries: int) -> tuple[float, int]:
    """Calls per second of `kind` over `seconds` with `concurrency` callers, and the call count."""
    async with aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        catalog = catalog_service_pb2_grpc.CatalogServiceStub(channel)
        deadline = time.perf_counter() + seconds
        count = 0

        async def caller() -> None:
            nonlocal count
            rng = random.Random()
            while time.perf_counter() < deadline:
                if kind == "noop":
                    await health.Check(health_pb2.HealthCheckRequest())
                elif kind == "get":
                    name = f"models/bench-{rng.randrange(entries):05d}"
                    await catalog.GetModel(catalog_service_pb2.GetModelRequest(name=name))
                else:
                    await catalog.ListModels(catalog_service_pb2.ListModelsRequest(page_size=100))
                count += 1

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return count / (time.perf_counter() - started), count


async def warm(address: str) -> None:
    """Read every entry once through the server (ListModels pages of 1000)."""
    async with aio.insecure_channel(address) as channel:
        catalog = catalog_service_pb2_grpc.CatalogServiceStub(channel)
        token = ""
        while True:
            page = await catalog.ListModels(
                catalog_service_pb2.ListModelsRequest(page_size=1000, page_token=token)
            )
            token = page.next_page_token
            if not token:
                return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{tmp}/catalog.db"
        fill(url, args.entries)
        server = ServerProcess(
            "catalog_service",
            ["--data-dir", tmp, "--database-url", url, "--log-level", "WARNING"],
            log_path=Path(tmp) / "server.log",
        )
        try:
            server.wait_serving()
            rows: dict[str, list[float]] = {"noop": [], "get": [], "list": []}
            # Server CPU time per call: less sensitive to the machine's other load than rates.
            cpu: dict[str, list[float]] = {"noop": [], "get": [], "list": []}
            proc = psutil.Process(server.proc.pid)
            # Steady state: one pass over every entry fills the server's parsed-entry cache
            # (a cold entry costs one JSON parse, ~0.2 ms, on its first read only).
            asyncio.run(warm(server.address))
            for round_no in range(1, args.rounds + 1):
                for kind in rows:
                    before = sum(proc.cpu_times()[:2])
                    rate, calls = asyncio.run(
                        drive(server.address, kind, args.seconds, args.concurrency, args.entries)
                    )
                    cpu[kind].append((sum(proc.cpu_times()[:2]) - before) / calls * 1e6)
                    rows[kind].append(rate)
                print(
                    f"round {round_no}: no-op {rows['noop'][-1]:6.0f}/s ({cpu['noop'][-1]:4.0f} us CPU)  "
                    f"GetModel {rows['get'][-1]:6.0f}/s ({cpu['get'][-1]:4.0f} us)  "
                    f"ListModels(100) {rows['list'][-1]:5.0f}/s ({cpu['list'][-1]:5.0f} us)"
                )
        finally:
            server.stop()
    noop = statistics.median(rows["noop"])
    get = statistics.median(rows["get"])
    listing = statistics.median(rows["list"])
    noop_cpu, get_cpu = statistics.median(cpu["noop"]), statistics.median(cpu["get"])
    ratio = noop_cpu / get_cpu
    print(f"server CPU per call: no-op {noop_cpu:.0f} us, GetModel {get_cpu:.0f} us (ratio {ratio:.2f})")
    print(f"median: no-op {noop:.0f}/s, GetModel {get:.0f}/s, ListModels {listing:.0f} pages/s")
    print(f"GetModel / no-op = {get / noop:.2f} (target >= 0.60); ListModels / no-op = {listing / noop:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
