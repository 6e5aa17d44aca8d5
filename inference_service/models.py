"""Loaded models: load by catalog id, hot-load adapters, unload, admission control.

`ModelManager` owns the engines of this server, one per loaded base model
(`Engine` from `inference_service.engines`), and the LoRA adapters loaded onto
them. Models are resolved through the catalog: the catalog entry gives the
local path, the chat template and sampling defaults, and a compatibility
check of the model against this worker's engine spec decides whether it may
load (FAILED_PRECONDITION with every failing rule's message otherwise).

Admission: at most `max_concurrent_requests` requests run at once; one more
gets RESOURCE_EXHAUSTED at once rather than queueing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from clients.catalog import AsyncCatalogClient, model_name
from clients.errors import ModelyardRpcError
from inference_service.engines.base import Engine
from inference_service.sampling import GenerationDefaults
from modelyard.catalog.v1 import model_pb2, worker_pb2
from server_kit import errors

log = logging.getLogger("modelyard.inference")

EngineFactory = Callable[[str, Path, int | None], Engine]
"""(engine name, model folder, max_model_len or None) -> a new, unstarted engine."""


@dataclass
class LoadedModel:
    """A base model served by one engine, with its adapters."""

    model: model_pb2.Model
    engine: Engine
    defaults: GenerationDefaults
    load_time: float = field(default_factory=time.time)
    adapters: dict[str, model_pb2.Model] = field(default_factory=dict)


def _defaults_of(model: model_pb2.Model) -> GenerationDefaults:
    llm = model.llm
    return GenerationDefaults(
        temperature=llm.default_temperature if llm.HasField("default_temperature") else None,
        top_p=llm.default_top_p if llm.HasField("default_top_p") else None,
    )


def failing_rules(report: worker_pb2.CompatibilityReport) -> list[str]:
    """The messages of the failed rules of a report."""
    return [f"{r.rule}: {r.message}" for r in report.results if r.outcome == worker_pb2.RULE_OUTCOME_FAIL]


class ModelManager:
    """The engines of this server, keyed by catalog model name."""

    def __init__(
        self,
        catalog: AsyncCatalogClient | None,
        engine_specs: dict[str, worker_pb2.EngineSpec],
        engine_factory: EngineFactory,
        *,
        preferred_engine: str = "auto",
        max_concurrent_requests: int = 64,
        load_on_first_use: bool = True,
    ) -> None:
        self.catalog = catalog
        self.engine_specs = engine_specs
        self.engine_factory = engine_factory
        self.preferred_engine = preferred_engine
        self.load_on_first_use = load_on_first_use
        self.max_concurrent_requests = max_concurrent_requests
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Lock] = {}
        self._running = 0

    # ---- admission ----------------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Requests running now."""
        return self._running

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one request slot; RESOURCE_EXHAUSTED when all are taken."""
        if self._running >= self.max_concurrent_requests:
            raise errors.ResourceExhausted(
                f"{self._running} requests running, the limit is {self.max_concurrent_requests}; retry later",
                reason="TOO_MANY_REQUESTS",
                metadata={"limit": self.max_concurrent_requests},
            )
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1

    # ---- catalog ------------------------------------------------------------------------------

    async def _catalog_model(self, name: str) -> model_pb2.Model:
        if self.catalog is None:
            raise errors.FailedPrecondition(
                "this inference server has no catalog configured (MODELYARD_CATALOG_ADDRESS)",
                reason="NO_CATALOG",
            )
        try:
            return await self.catalog.get_model(name)
        except ModelyardRpcError as error:
            if error.reason == "MODEL_NOT_FOUND" or error.code.name == "NOT_FOUND":
                raise errors.NotFound(
                    f"model {name} is not in the catalog", reason="MODEL_NOT_FOUND", metadata={"model": name}
                ) from None
            raise errors.Unavailable(
                f"catalog lookup of {name} failed: {error.message}", reason="CATALOG_UNAVAILABLE"
            ) from None

    async def _choose_engine(self, model: model_pb2.Model) -> str:
        """The engine to serve `model` with: the configured one, or in `auto` the first compatible."""
        assert self.catalog is not None
        candidates = list(self.engine_specs) if self.preferred_engine == "auto" else [self.preferred_engine]
        reasons: list[str] = []
        for engine in candidates:
            spec = self.engine_specs.get(engine)
            if spec is None:
                raise errors.FailedPrecondition(
                    f"engine {engine} is not available here", reason="ENGINE_UNAVAILABLE"
                )
            report = await self.catalog.check_compatibility(model.name, engine_spec=spec)
            if report.verdict != worker_pb2.VERDICT_INCOMPATIBLE:
                return engine
            reasons.extend(f"[{engine}] {m}" for m in failing_rules(report))
        raise errors.FailedPrecondition(
            f"{model.name} cannot run on this worker: " + "; ".join(reasons),
            reason="MODEL_INCOMPATIBLE",
            metadata={"model": model.name},
        )

    # ---- load / unload ------------------------------------------------------------------------

    async def load(self, name: str, *, max_model_len: int | None = None) -> LoadedModel:
        """Load a base model, or hot-load an adapter onto its (loaded or auto-loaded) base."""
        name = model_name(name)
        if name in self._loaded:
            return self._loaded[name]
        for loaded in self._loaded.values():
            if name in loaded.adapters:
                return loaded
        lock = self._loading.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self._loaded:
                return self._loaded[name]
            model = await self._catalog_model(name)
            if model.state != model_pb2.MODEL_STATE_READY:
                raise errors.FailedPrecondition(
                    f"{name} is {model_pb2.ModelState.Name(model.state)}, not READY", reason="MODEL_NOT_READY"
                )
            if model.HasField("llm") and model.llm.HasField("adapter"):
                return await self._load_adapter(model)
            engine_name = await self._choose_engine(model)
            engine = self.engine_factory(engine_name, Path(model.local_path), max_model_len)
            started = time.perf_counter()
            await engine.start()
            loaded = LoadedModel(model=model, engine=engine, defaults=_defaults_of(model))
            self._loaded[name] = loaded
            log.info("loaded %s on %s in %.1f s", name, engine_name, time.perf_counter() - started)
            return loaded

    async def _load_adapter(self, adapter: model_pb2.Model) -> LoadedModel:
        base_name = adapter.llm.adapter.base_model or adapter.parent
        if not base_name:
            raise errors.FailedPrecondition(
                f"adapter {adapter.name} has no base model in the catalog; import its base first",
                reason="ADAPTER_BASE_UNKNOWN",
            )
        base = self._loaded.get(base_name)
        if base is None:
            base = await self.load(base_name)
        if not base.engine.supports_lora:
            raise errors.FailedPrecondition(
                f"engine {base.engine.name} cannot apply LoRA adapters", reason="LORA_UNSUPPORTED"
            )
        await base.engine.add_adapter(adapter.name, Path(adapter.local_path))
        base.adapters[adapter.name] = adapter
        log.info("hot-loaded adapter %s onto %s", adapter.name, base.model.name)
        return base

    async def unload(self, name: str) -> None:
        """Unload a base model (and its adapters), or one adapter."""
        name = model_name(name)
        loaded = self._loaded.pop(name, None)
        if loaded is not None:
            await loaded.engine.close()
            log.info("unloaded %s", name)
            return
        for base in self._loaded.values():
            if name in base.adapters:
                await base.engine.remove_adapter(name)
                del base.adapters[name]
                return
        raise errors.NotFound(f"{name} is not loaded", reason="MODEL_NOT_LOADED", metadata={"model": name})

    def loaded(self) -> list[LoadedModel]:
        """Loaded base models, in load order."""
        return list(self._loaded.values())

    async def target(self, model: str, adapter: str = "") -> tuple[LoadedModel, str | None]:
        """The loaded model (and adapter id) a request runs on, loading them when allowed."""
        if not model:
            raise errors.InvalidArgument(
                "model is required",
                reason="MISSING_FIELD",
                violations=[errors.FieldViolation("model", "required")],
            )
        name = model_name(model)
        loaded = self._loaded.get(name)
        if loaded is None:
            # An adapter named as the model: serve it on its base.
            for base in self._loaded.values():
                if name in base.adapters:
                    return base, name
            if not self.load_on_first_use:
                raise errors.NotFound(
                    f"{name} is not loaded; call LoadModel first",
                    reason="MODEL_NOT_LOADED",
                    metadata={"model": name},
                )
            loaded = await self.load(name)
            if name != loaded.model.name:
                return loaded, name
        if not adapter:
            return loaded, None
        adapter_name = model_name(adapter)
        if adapter_name not in loaded.adapters:
            if not self.load_on_first_use:
                raise errors.NotFound(
                    f"adapter {adapter_name} is not loaded on {name}", reason="ADAPTER_NOT_LOADED"
                )
            adapter_model = await self._catalog_model(adapter_name)
            base_name = adapter_model.llm.adapter.base_model or adapter_model.parent
            if not adapter_model.llm.HasField("adapter"):
                raise errors.InvalidArgument(
                    f"{adapter_name} is not a LoRA adapter",
                    reason="NOT_AN_ADAPTER",
                    violations=[errors.FieldViolation("adapter", "not a LoRA adapter")],
                )
            if base_name != name:
                raise errors.FailedPrecondition(
                    f"adapter {adapter_name} was trained on {base_name or 'an unknown base'}, not on {name}",
                    reason="ADAPTER_BASE_MISMATCH",
                    metadata={"adapter": adapter_name, "adapter_base": base_name, "model": name},
                )
            await self._load_adapter(adapter_model)
        return loaded, adapter_name

    async def close(self) -> None:
        """Unload everything."""
        for name in list(self._loaded):
            loaded = self._loaded.pop(name)
            await loaded.engine.close()
