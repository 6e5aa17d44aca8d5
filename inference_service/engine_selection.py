"""Which of this server's engines runs a model: the first that really can.

A server may have several engines in order of preference (`--engine auto`: vLLM, then
transformers). `EngineSelector.start` tries them in that order, and each try goes
through the same steps, cheapest first:

1. the catalog's compatibility check of the model against the engine's spec (the rules,
   including the `observed` rule: what this engine did when any worker tried the model);
2. the engine's dry run (`Engine.dry_run`: its own configuration for the model, no
   weights loaded; vLLM also asks its attention backend about the head size and dtype);
3. loading (`Engine.start`) and one generation step (`Engine.first_step`): some engines
   accept a model at load and fail at its first forward step.

A failure at steps 2 and 3 that the model causes (`ModelUnsupported`: the same model on
the same engine fails the same way) is reported to the catalog as an `EngineOutcome`, so
that no worker routes the model to that engine again, remembered here too (in case the
catalog is unreachable), and the next engine is tried. The engine is never restarted
for it. When no engine can run the model the answer is FAILED_PRECONDITION:
`MODEL_UNSUPPORTED_BY_ENGINE` when an engine itself refused it (with the engine's
message), `MODEL_INCOMPATIBLE` when only the rules did. Any other failure (the catalog
down, an engine process killed) propagates unchanged: it says nothing about the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clients.catalog import AsyncCatalogClient
from clients.errors import ModelyardRpcError
from inference_service.engines.base import Engine, ModelUnsupported
from modelyard.catalog.v1 import model_pb2, worker_pb2
from server_kit import errors

log = logging.getLogger("modelyard.inference")

EngineFactory = Callable[[str, Path, int | None], Engine]
"""(engine name, model folder, max_model_len or None) -> a new, unstarted engine."""

MAX_REMEMBERED = 1024
"""Model-caused failures a selector remembers locally (oldest forgotten first)."""

STAGES: dict[str, worker_pb2.EngineOutcomeStage.ValueType] = {
    "dry_run": worker_pb2.ENGINE_OUTCOME_STAGE_DRY_RUN,
    "load": worker_pb2.ENGINE_OUTCOME_STAGE_LOAD,
    "first_step": worker_pb2.ENGINE_OUTCOME_STAGE_FIRST_STEP,
}


def failing_rules(report: worker_pb2.CompatibilityReport) -> list[str]:
    """The messages of the failed rules of a report."""
    return [f"{r.rule}: {r.message}" for r in report.results if r.outcome == worker_pb2.RULE_OUTCOME_FAIL]


@dataclass
class Selection:
    """What trying the engines gave: the engine that runs the model (None when none can or,
    for a validation, which would) and every outcome seen on the way."""

    engine_name: str | None
    engine: Engine | None
    outcomes: list[worker_pb2.EngineOutcome]


class EngineSelector:
    """Tries this server's engines for a model, in order of preference (see the module doc)."""

    def __init__(
        self,
        catalog: AsyncCatalogClient | None,
        engine_specs: dict[str, worker_pb2.EngineSpec],
        engine_factory: EngineFactory,
        *,
        preferred_engine: str = "auto",
    ) -> None:
        self.catalog = catalog
        self.engine_specs = engine_specs
        self.engine_factory = engine_factory
        self.preferred_engine = preferred_engine
        self.worker_name = ""
        """`workers/{id}` once the server registered; named in the outcomes it reports."""
        self._unsupported: OrderedDict[tuple[str, str, str], ModelUnsupported] = OrderedDict()
        """(model, etag, engine) -> why that engine cannot run it; the newest `MAX_REMEMBERED`."""

    def candidates(self) -> list[str]:
        """Engine names to try, in order."""
        if self.preferred_engine == "auto":
            return list(self.engine_specs)
        if self.preferred_engine not in self.engine_specs:
            raise errors.FailedPrecondition(
                f"engine {self.preferred_engine} is not available here", reason="ENGINE_UNAVAILABLE"
            )
        return [self.preferred_engine]

    async def start(self, model: model_pb2.Model, max_model_len: int | None) -> Selection:
        """Start the first engine that runs `model` (checked, dry-run, loaded, one step)."""
        return await self._select(model, max_model_len, validate_only=False)

    async def validate(self, model: model_pb2.Model, max_model_len: int | None) -> Selection:
        """Which engine would run `model`: the checks and dry runs only, nothing loaded."""
        return await self._select(model, max_model_len, validate_only=True)

    async def check_rules(self, model: model_pb2.Model) -> str:
        """The first engine whose compatibility rules pass (for models that are not dry-run)."""
        reasons: list[str] = []
        for name in self.candidates():
            report = await self._check(model, name)
            if report.verdict != worker_pb2.VERDICT_INCOMPATIBLE:
                return name
            reasons.extend(f"[{name}] {m}" for m in failing_rules(report))
        raise self._refusal(model, reasons, unsupported=False)

    async def _check(self, model: model_pb2.Model, name: str) -> worker_pb2.CompatibilityReport:
        if self.catalog is None:
            raise errors.FailedPrecondition(
                "this inference server has no catalog configured (MODELYARD_CATALOG_ADDRESS)",
                reason="NO_CATALOG",
            )
        return await self.catalog.check_compatibility(model.name, engine_spec=self.engine_specs[name])

    async def _select(
        self, model: model_pb2.Model, max_model_len: int | None, *, validate_only: bool
    ) -> Selection:
        reasons: list[str] = []
        outcomes: list[worker_pb2.EngineOutcome] = []
        unsupported = False
        path = Path(model.local_path)
        for name in self.candidates():
            known = self._unsupported.get((model.name, model.etag, name))
            if known is not None:
                reasons.append(f"[{name}] {known.message}")
                unsupported = True
                continue
            report = await self._check(model, name)
            if report.verdict == worker_pb2.VERDICT_INCOMPATIBLE:
                rules = failing_rules(report)
                unsupported = unsupported or any(r.startswith("observed:") for r in rules)
                reasons.extend(f"[{name}] {m}" for m in rules)
                continue
            engine = self.engine_factory(name, path, max_model_len)
            try:
                await asyncio.to_thread(engine.dry_run)
                if validate_only:
                    outcomes.append(await self._record(model, name, "dry_run", None))
                    await engine.close()
                    return Selection(name, None, outcomes)
                await self._load(engine)
                await engine.first_step()
            except ModelUnsupported as exc:
                with contextlib.suppress(Exception):
                    await engine.close()
                self._remember(model, name, exc)
                outcomes.append(await self._record(model, name, exc.stage, exc))
                reasons.append(f"[{name}] {exc.message}")
                unsupported = True
                log.warning("%s cannot run %s: %s", name, model.name, exc.message)
                continue
            except BaseException:
                with contextlib.suppress(Exception):
                    await engine.close()
                raise
            outcomes.append(await self._record(model, name, "first_step", None))
            return Selection(name, engine, outcomes)
        raise self._refusal(model, reasons, unsupported)

    @staticmethod
    async def _load(engine: Engine) -> None:
        """`engine.start()`; an engine that refuses to start the model is a model-caused failure."""
        try:
            await engine.start()
        except errors.FailedPrecondition as exc:
            if exc.reason != "ENGINE_START_FAILED":
                raise
            raise ModelUnsupported(engine.name, "load", exc.message) from exc

    @staticmethod
    def _refusal(model: model_pb2.Model, reasons: list[str], unsupported: bool) -> errors.FailedPrecondition:
        return errors.FailedPrecondition(
            f"{model.name} cannot run on this worker: " + "; ".join(reasons),
            reason="MODEL_UNSUPPORTED_BY_ENGINE" if unsupported else "MODEL_INCOMPATIBLE",
            metadata={"model": model.name},
        )

    async def record_unsupported(self, model: model_pb2.Model, failure: ModelUnsupported) -> None:
        """Remember and report that `failure.engine` cannot run `model` (seen outside `start`)."""
        self._remember(model, failure.engine, failure)
        await self._record(model, failure.engine, failure.stage, failure)

    def _remember(self, model: model_pb2.Model, engine: str, failure: ModelUnsupported) -> None:
        """Keep `failure` for the pair, the newest `MAX_REMEMBERED` pairs only (the catalog's
        record is the lasting one; this one spares a crash when the catalog is unreachable)."""
        key = (model.name, model.etag, engine)
        self._unsupported[key] = failure
        self._unsupported.move_to_end(key)
        while len(self._unsupported) > MAX_REMEMBERED:
            self._unsupported.popitem(last=False)

    async def _record(
        self, model: model_pb2.Model, name: str, stage: str, failure: ModelUnsupported | None
    ) -> worker_pb2.EngineOutcome:
        """The outcome of trying `name` on `model`, reported to the catalog (best effort)."""
        spec = self.engine_specs[name]
        outcome = worker_pb2.EngineOutcome(
            engine=name,
            engine_version=spec.capabilities.engine_version,
            device_type=spec.device.type,
            supported=failure is None,
            message=failure.engine_message if failure is not None else "",
            stage=STAGES[stage],
            worker=self.worker_name,
            model_etag=model.etag,
        )
        if self.catalog is not None:
            try:
                return await self.catalog.report_engine_outcome(model.name, outcome)
            except ModelyardRpcError as error:
                log.warning("could not report %s's outcome on %s to the catalog: %s", model.name, name, error)
        return outcome
