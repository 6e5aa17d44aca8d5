"""FindWorkers: the healthy workers that can run a model, best first, and why the others cannot.

`rank()` checks the model against every worker (see
`catalog_service.compatibility.check`) and adds a `worker_state` rule in front
of each report: only HEALTHY workers are routed to. Matches are HEALTHY
workers whose verdict is not INCOMPATIBLE, ordered by

1. the model already loaded on the worker (for an adapter: the adapter, then
   its base model),
2. the engine that would run it, faster first (`EngineTable.preference`:
   vLLM, then llama.cpp, then transformers; a worker whose vLLM refuses the
   model and that falls back to transformers ranks after one whose vLLM runs it),
3. free memory, most first (total memory when free is not reported),
4. load (running + queued), least first,
5. worker name, for a stable order.

Every other worker is rejected with its report, so an empty answer says why
per worker.

For an `Embed` (`embeddings=True`) each worker is checked as the worker of its
engines that compute embeddings only (`WorkerCapabilities.supports_embeddings`:
transformers, not vLLM), so the report is that engine's; a worker without one is
rejected with an `embeddings` result that says so (after its own engines' rules).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from catalog_service.compatibility import check, engines
from catalog_service.compatibility.context import (
    FAIL,
    PASS,
    CompatibilityReport,
    Model,
    ModelLookup,
    OutcomeLookup,
    RuleResult,
    Worker,
    adapter_base,
    is_adapter,
    verdict_of,
)
from modelyard.catalog.v1 import worker_pb2

Ranked = list[tuple[Worker, CompatibilityReport]]


def _ago(worker: Worker, now: datetime) -> str | None:
    """`42 s`, `5 min`, `3 h` since the worker's last heartbeat, or None without one."""
    if not worker.HasField("last_heartbeat_time"):
        return None
    seconds = max(0, int((now - worker.last_heartbeat_time.ToDatetime(tzinfo=UTC)).total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


def worker_state_result(worker: Worker, now: datetime | None = None) -> RuleResult:
    """The `worker_state` rule: PASS for a HEALTHY worker, FAIL (not routed to) otherwise."""
    now = now or datetime.now(UTC)
    ago = _ago(worker, now)
    state = worker.state
    if state == worker_pb2.WORKER_STATE_HEALTHY:
        when = f" (last heartbeat {ago} ago)" if ago is not None else ""
        return RuleResult(rule="worker_state", outcome=PASS, message=f"worker is healthy{when}")
    if state == worker_pb2.WORKER_STATE_UNAVAILABLE:
        lapsed = (
            f"worker heartbeat lapsed {ago} ago" if ago is not None else "worker has never sent a heartbeat"
        )
        return RuleResult(rule="worker_state", outcome=FAIL, message=f"{lapsed}; not routed to")
    if state == worker_pb2.WORKER_STATE_DRAINING:
        return RuleResult(
            rule="worker_state", outcome=FAIL, message="worker is draining (shutting down); not routed to"
        )
    return RuleResult(
        rule="worker_state",
        outcome=FAIL,
        message="worker state is unknown; not routed to until it heartbeats",
    )


def _loaded_rank(model: Model, worker: Worker) -> int:
    """0: the model is loaded; 1: an adapter's base is loaded; 2: nothing useful is loaded."""
    models = {m.model for m in worker.loaded_models}
    adapters = {a for m in worker.loaded_models for a in m.adapters}
    if model.name in models or model.name in adapters:
        return 0
    if is_adapter(model) and adapter_base(model) in models:
        return 1
    return 2


def _engine_rank(report: CompatibilityReport) -> int:
    table = engines.get(report.engine)
    return table.preference if table is not None else 100


def _free_memory(worker: Worker) -> int:
    device = worker.device
    return device.free_memory_bytes if device.free_memory_bytes > 0 else device.memory_bytes


def embedding_view(worker: Worker) -> Worker | None:
    """`worker` with only its engines that compute embeddings, or None when it has none."""
    engines_ = list(worker.engines) or [worker.capabilities]
    able = [caps for caps in engines_ if caps.supports_embeddings]
    if not able:
        return None
    view = Worker()
    view.CopyFrom(worker)
    view.capabilities.CopyFrom(able[0])
    del view.engines[:]
    if len(able) > 1:
        view.engines.extend(able)
    return view


def _cannot_embed(worker: Worker) -> RuleResult:
    """The `embeddings` result of a worker none of whose engines computes embeddings."""
    engines_ = [caps.engine for caps in (list(worker.engines) or [worker.capabilities])]
    message = (
        f"no engine of this worker ({', '.join(e or '(none)' for e in engines_)}) computes embeddings; "
        "Embed needs a worker with the transformers engine"
    )
    return RuleResult(rule="embeddings", outcome=FAIL, message=message)


def rank(
    model: Model,
    workers: Iterable[Worker],
    role: worker_pb2.WorkerRole.ValueType | None = None,
    lookup_model: ModelLookup | None = None,
    *,
    training_method: str | None = None,
    now: datetime | None = None,
    lookup_outcomes: OutcomeLookup | None = None,
    embeddings: bool = False,
) -> tuple[Ranked, Ranked]:
    """Split `workers` into ranked matches and rejected ones, each with its compatibility report.

    `role` restricts to workers of that role (any when None or unspecified);
    `now` is the time heartbeat ages are measured against (default: now, UTC);
    `lookup_outcomes` gives what engines did with a model (the `observed` rule);
    `embeddings` judges each worker by its engines that compute embeddings (see the module doc).
    """
    now = now or datetime.now(UTC)
    matches: Ranked = []
    rejected: Ranked = []
    for worker in workers:
        view = embedding_view(worker) if embeddings else worker
        report = check(
            model,
            worker if view is None else view,
            role=role,
            lookup_model=lookup_model,
            training_method=training_method,
            lookup_outcomes=lookup_outcomes,
        )
        if view is None:
            report.results.append(_cannot_embed(worker))
        state = worker_state_result(worker, now)
        results = [state, *report.results]
        del report.results[:]
        report.results.extend(results)
        report.verdict = verdict_of(report.results)
        if report.verdict == worker_pb2.VERDICT_INCOMPATIBLE:
            rejected.append((worker, report))
        else:
            matches.append((worker, report))
    matches.sort(
        key=lambda pair: (
            _loaded_rank(model, pair[0]),
            _engine_rank(pair[1]),
            -_free_memory(pair[0]),
            pair[0].load.running + pair[0].load.queued,
            pair[0].name,
        )
    )
    rejected.sort(key=lambda pair: pair[0].name)
    return matches, rejected
