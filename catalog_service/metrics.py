"""The catalog's own Prometheus metrics: models per kind and state, workers per role and state.

Computed from the store when Prometheus scrapes (one GROUP BY for models, one
read of the worker table), so every replica on a shared database reports the
same totals: aggregate them with `max`, not `sum`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from catalog_service.store import CatalogStore
from modelyard.catalog.v1 import model_pb2, worker_pb2
from server_kit.metrics import PREFIX, ScrapeCollector


def _names(enum: object, prefix: str) -> list[str]:
    """Enum value names without their prefix and without UNSPECIFIED: `MODEL_STATE_READY` -> `READY`."""
    keys: list[str] = enum.keys()  # type: ignore[attr-defined]
    return [key.removeprefix(prefix) for key in keys if not key.endswith("_UNSPECIFIED")]


def catalog_metrics(store: CatalogStore) -> Iterable[Metric]:
    """The catalog gauges, read from `store` now."""
    models = GaugeMetricFamily(
        f"{PREFIX}_catalog_models", "Models in the catalog, by kind and state.", labels=["kind", "state"]
    )
    counts = {
        (kind.removeprefix("MODEL_KIND_"), state.removeprefix("MODEL_STATE_")): count
        for (kind, state), count in store.count_models().items()
    }
    for kind in _names(model_pb2.ModelKind, "MODEL_KIND_"):
        for state in _names(model_pb2.ModelState, "MODEL_STATE_"):
            models.add_metric([kind, state], counts.pop((kind, state), 0))
    for (kind, state), count in sorted(counts.items()):  # values this build does not know
        models.add_metric([kind, state], count)

    workers = GaugeMetricFamily(
        f"{PREFIX}_catalog_workers",
        "Registered workers, by role and state (UNAVAILABLE once their heartbeat lapsed).",
        labels=["role", "state"],
    )
    by_role_state: dict[tuple[str, str], int] = {
        (role, state): 0
        for role in _names(worker_pb2.WorkerRole, "WORKER_ROLE_")
        for state in _names(worker_pb2.WorkerState, "WORKER_STATE_")
    }
    for worker in store.all_workers():
        key = (
            worker_pb2.WorkerRole.Name(worker.role).removeprefix("WORKER_ROLE_"),
            worker_pb2.WorkerState.Name(worker.state).removeprefix("WORKER_STATE_"),
        )
        by_role_state[key] = by_role_state.get(key, 0) + 1
    for (role, state), count in by_role_state.items():
        workers.add_metric([role, state], count)
    return [models, workers]


def catalog_collector(store: Callable[[], CatalogStore | None]) -> ScrapeCollector:
    """A collector of the catalog gauges; `store()` is the open store (None before start)."""

    def compute() -> Iterable[Metric]:
        current = store()
        return catalog_metrics(current) if current is not None else []

    return ScrapeCollector("catalog", compute)
