"""The inference service's own Prometheus metrics: tokens, time to first token, queue, KV cache.

Counted as outputs stream out of the engines (`InferenceMetrics.observe`, the
same for vLLM and transformers), and read from the model manager and the
engines when Prometheus scrapes:

- `modelyard_inference_prompt_tokens_total{model}`, `modelyard_inference_generated_tokens_total{model}`
  (tokens/s: `rate(...)`);
- `modelyard_inference_time_to_first_token_seconds{model}`: from the request
  reaching the engine (prompt tokenized and checked) to its first output;
- `modelyard_inference_completions_total{model, finish_reason}`;
- `modelyard_inference_requests_running`, `modelyard_inference_requests_limit`:
  admitted requests of this server and the admission limit;
- `modelyard_inference_engine_requests{model, engine, state}`: requests an engine
  holds, `waiting` (queued by its scheduler) or `running`;
- `modelyard_inference_kv_cache_usage_ratio{model, engine}`: the share of the KV
  cache in use (0-1), where the engine reports it (vLLM);
- `modelyard_inference_loaded_adapters{model}`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from inference_service.engines.base import EngineDelta
from inference_service.models import ModelManager
from server_kit.metrics import PREFIX, ScrapeCollector

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
"""Time-to-first-token buckets (seconds), as vLLM's."""


class InferenceMetrics:
    """The counters the generation paths update, and the gauges read at scrape time."""

    def __init__(self) -> None:
        # Made with registry=None: the server registers them (`collectors`) when metrics are on.
        self.prompt_tokens = Counter(
            f"{PREFIX}_inference_prompt_tokens",
            "Prompt tokens of generation requests.",
            ["model"],
            registry=None,
        )
        self.generated_tokens = Counter(
            f"{PREFIX}_inference_generated_tokens", "Tokens generated.", ["model"], registry=None
        )
        self.completions = Counter(
            f"{PREFIX}_inference_completions",
            "Completions finished, by finish reason (stop, length, abort).",
            ["model", "finish_reason"],
            registry=None,
        )
        self.time_to_first_token = Histogram(
            f"{PREFIX}_inference_time_to_first_token_seconds",
            "Time from a request reaching the engine to its first output.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=None,
        )

    async def observe(
        self, model: str, deltas: AsyncGenerator[EngineDelta, None]
    ) -> AsyncIterator[EngineDelta]:
        """Pass `deltas` (one request's engine stream) through, counting tokens and timing the first."""
        started = time.perf_counter()
        first = True
        generated = self.generated_tokens.labels(model)
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                if first and (delta.token_ids or delta.text):
                    self.time_to_first_token.labels(model).observe(time.perf_counter() - started)
                    first = False
                if delta.token_ids:
                    generated.inc(len(delta.token_ids))
                if delta.finish_reason is not None:
                    self.completions.labels(model, delta.finish_reason.name.lower()).inc()
                if delta.usage is not None:
                    self.prompt_tokens.labels(model).inc(delta.usage.prompt_tokens)
                yield delta

    def collectors(self, manager: Callable[[], ModelManager | None]) -> list[Collector]:
        """What the server registers: the counters, and the gauges of `manager()` (None before start)."""

        def compute() -> Iterable[Metric]:
            current = manager()
            return inference_gauges(current) if current is not None else []

        return [
            self.prompt_tokens,
            self.generated_tokens,
            self.completions,
            self.time_to_first_token,
            ScrapeCollector("inference", compute),
        ]


def inference_gauges(manager: ModelManager) -> Iterable[Metric]:
    """Admission, engine queues and KV-cache use, read from `manager` now."""
    running = GaugeMetricFamily(f"{PREFIX}_inference_requests_running", "Generation requests admitted now.")
    running.add_metric([], manager.running)
    limit = GaugeMetricFamily(
        f"{PREFIX}_inference_requests_limit",
        "Requests admitted at once before RESOURCE_EXHAUSTED (MAX_CONCURRENT_REQUESTS).",
    )
    limit.add_metric([], manager.max_concurrent_requests)
    engine_requests = GaugeMetricFamily(
        f"{PREFIX}_inference_engine_requests",
        "Requests an engine holds: waiting in its queue or running.",
        labels=["model", "engine", "state"],
    )
    kv_cache = GaugeMetricFamily(
        f"{PREFIX}_inference_kv_cache_usage_ratio",
        "Share of the engine's KV cache in use (0-1; engines that report it).",
        labels=["model", "engine"],
    )
    adapters = GaugeMetricFamily(
        f"{PREFIX}_inference_loaded_adapters", "LoRA adapters loaded onto a model.", labels=["model"]
    )
    for loaded in manager.loaded():
        model, engine = loaded.model.name, loaded.engine.name
        stats = loaded.engine.load_stats()
        engine_requests.add_metric([model, engine, "waiting"], stats.waiting)
        engine_requests.add_metric([model, engine, "running"], stats.running)
        if stats.kv_cache_usage is not None:
            kv_cache.add_metric([model, engine], stats.kv_cache_usage)
        adapters.add_metric([model], len(loaded.adapters))
    return [running, limit, engine_requests, kv_cache, adapters]
