"""A short version of `benchmarks/load_test.py`: concurrent clients against the catalog and the
inference server (vLLM) get OK or the documented RESOURCE_EXHAUSTED back-pressure, nothing
else, and the servers' memory stays flat. Correctness under load, not speed.
"""

from __future__ import annotations

import pytest
from grpc import aio

from clients.catalog import CatalogClient
from modelyard.catalog.v1 import model_pb2
from tests.reliability.faults import rss_bytes
from tests.reliability.load import catalog_calls, format_table, inference_calls, run_load
from tests.reliability.stack import MODEL_ID, Stack

pytestmark = pytest.mark.slow

CLIENTS = 8
"""Twice the inference server's admission limit in the `stack` fixture."""
SECONDS = 0.75
WARM_UP_SECONDS = 0.3
RSS_GROWTH_LIMITS = {"catalog": 64 * 1024**2, "inference": 256 * 1024**2}
"""Generous bounds on memory growth over the run: a leak per request would pass them."""


async def test_short_load_gets_ok_or_back_pressure_only_and_memory_stays_flat(stack: Stack) -> None:
    assert stack.catalog is not None and stack.inference is not None
    entries = [f"load-{i}" for i in range(50)]
    with CatalogClient(stack.catalog_address) as catalog:
        for model_id in entries:
            catalog.create_model(model_id, model_pb2.Model(display_name=model_id, tags=["load"]))
    pids = {"catalog": stack.catalog.proc.pid, "inference": stack.inference.proc.pid}

    async with (
        aio.insecure_channel(stack.catalog_address) as catalog_channel,
        aio.insecure_channel(stack.inference_address) as inference_channel,
    ):
        calls = {
            **catalog_calls(catalog_channel, entries),
            **inference_calls(inference_channel, f"models/{MODEL_ID}"),
        }
        for name, call in calls.items():
            await run_load(name, call, clients=CLIENTS, seconds=WARM_UP_SECONDS)
        before = {service: rss_bytes(pid) for service, pid in pids.items()}
        results = [
            await run_load(name, call, clients=CLIENTS, seconds=SECONDS) for name, call in calls.items()
        ]
        after = {service: rss_bytes(pid) for service, pid in pids.items()}

    print(format_table(results))
    for result in results:
        assert result.other_errors == 0, f"{result.name}: {dict(result.errors)}, first: {result.first_error}"
        assert result.ok > 0, result.name
    # The inference limit (4) is below the clients (8): back-pressure answered some of them.
    assert sum(r.exhausted for r in results if r.name.startswith("inference")) > 0
    for service, limit in RSS_GROWTH_LIMITS.items():
        growth = after[service] - before[service]
        print(f"{service} RSS {before[service] / 2**20:.0f} -> {after[service] / 2**20:.0f} MiB")
        assert growth < limit, f"{service} grew by {growth / 2**20:.0f} MiB under load"
