"""The catalog's domain logic: import flow, lineage, resolution, routing.

`Catalog` sits between the servicer (protos in, protos out) and the store,
detection, validation and compatibility modules. Store calls are blocking
(SQLAlchemy) and run in worker threads; file work (hashing, header reads)
does too, so the event loop keeps serving while an import runs.

The import flow (`import_model`):

1. resolve the source (local folder or file, HF cache, hub) inside the allowed
   roots; bad input fails here and nothing is written;
2. pick the id: the requested one (ALREADY_EXISTS when taken) or one derived
   from the source, versioned `-v2`, `-v3`, ... when the source was imported
   before;
3. create the entry IMPORTING; hash every file (one read each) -> VALIDATING;
   detect the typed config, link the parent, run the validation checks ->
   READY;
4. on any failure after step 3 the entry is deleted (watchers see FAILED with
   the reason, then the deletion) and the error is raised: a failed import
   leaves nothing behind. An import interrupted by a crash is marked FAILED
   (`IMPORT_INTERRUPTED`) at the next start.

Creation and clean-up are one unit: a cancelled import (the client's deadline passed,
it disconnected) waits for the blocking step under way (the thread is not abandoned),
stops the hashing (a cancel event checked between chunks) and removes the entry, even
when the cancellation lands while the entry is being created (`_in_thread`, `_settle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from catalog_service import compatibility, ranking, sources, validation
from catalog_service.detection import detect
from catalog_service.detection import missing_fields as detection_missing_fields
from catalog_service.dry_run import DryRun
from catalog_service.events import ModelEvents
from catalog_service.hashing import hash_files
from catalog_service.outcome_store import MAX_ENGINE_BYTES, MAX_ETAG_BYTES, MAX_MESSAGE_CHARS, OutcomeStore
from catalog_service.settings import CatalogSettings
from catalog_service.store import CatalogStore
from catalog_service.store_common import check_bytes as _check_bytes
from catalog_service.store_common import check_enum as _check_enum
from modelyard.catalog.v1 import catalog_service_pb2, model_pb2, worker_pb2
from server_kit import errors
from server_kit.security import NAME_FIELD_BYTES

log = logging.getLogger("modelyard.catalog")

TERMINAL_STATES = (model_pb2.MODEL_STATE_READY, model_pb2.MODEL_STATE_FAILED)
MAX_FIND_WORKERS_BYTES = 16 * 1024 * 1024
"""Most bytes of one FindWorkers answer (a quarter of the default message limit)."""


def model_id_of(name: str, field_name: str = "name") -> str:
    """`models/x` (or `x`) -> `x`; InvalidArgument when empty."""
    model_id = name.removeprefix("models/")
    if not model_id:
        raise errors.InvalidArgument(
            f"{field_name} is required (models/{{model}})",
            reason="MISSING_FIELD",
            violations=[errors.FieldViolation(field_name, "required")],
        )
    return model_id


def worker_id_of(name: str, field_name: str = "name") -> str:
    """`workers/x` (or `x`) -> `x`; InvalidArgument when empty."""
    worker_id = name.removeprefix("workers/")
    if not worker_id:
        raise errors.InvalidArgument(
            f"{field_name} is required (workers/{{worker}})",
            reason="MISSING_FIELD",
            violations=[errors.FieldViolation(field_name, "required")],
        )
    return worker_id


def normalized_outcome(outcome: worker_pb2.EngineOutcome) -> worker_pb2.EngineOutcome:
    """A copy of a reported engine outcome, checked and tidied for storage.

    INVALID_ARGUMENT (with field violations) for a missing `engine`, an enum
    number the contract does not define (`device_type`, `stage`) and key strings
    over their bounds or with a NUL (PostgreSQL text cannot hold one);
    `message` is cut to `MAX_MESSAGE_CHARS` (an engine's traceback may be
    long), `worker` gets its `workers/` prefix, and `report_time` is left to
    the store.
    """
    entry = worker_pb2.EngineOutcome()
    entry.CopyFrom(outcome)
    entry.engine = entry.engine.strip()
    if not entry.engine:
        raise errors.InvalidArgument(
            "outcome.engine is required (the engine that tried the model, e.g. vllm)",
            reason="MISSING_FIELD",
            violations=[errors.FieldViolation("outcome.engine", "required")],
        )
    _check_bytes("outcome.engine", entry.engine, MAX_ENGINE_BYTES)
    _check_bytes("outcome.engine_version", entry.engine_version, MAX_ENGINE_BYTES)
    _check_bytes("outcome.model_etag", entry.model_etag, MAX_ETAG_BYTES)
    _check_enum(worker_pb2.DeviceType, entry.device_type, "outcome.device_type")
    _check_enum(worker_pb2.EngineOutcomeStage, entry.stage, "outcome.stage")
    if entry.worker and not entry.worker.startswith("workers/"):
        entry.worker = "workers/" + entry.worker
    _check_bytes("outcome.worker", entry.worker, NAME_FIELD_BYTES)
    for name in ("engine", "engine_version", "model_etag", "worker"):
        if "\x00" in getattr(entry, name):
            raise errors.InvalidArgument(
                f"outcome.{name} contains a NUL character",
                violations=[errors.FieldViolation(f"outcome.{name}", "no NUL characters")],
            )
    if len(entry.message) > MAX_MESSAGE_CHARS:
        entry.message = entry.message[: MAX_MESSAGE_CHARS - 4] + " ..."
    entry.ClearField("report_time")
    return entry


def _memoized(
    lookup: Callable[[str], list[worker_pb2.EngineOutcome]],
) -> Callable[[str], list[worker_pb2.EngineOutcome]]:
    """`lookup` with its answers kept for one request (rules ask once per worker and engine)."""
    answers: dict[str, list[worker_pb2.EngineOutcome]] = {}

    def cached(name: str) -> list[worker_pb2.EngineOutcome]:
        if name not in answers:
            answers[name] = lookup(name)
        return answers[name]

    return cached


LOOP_PAGE_MAX = 100
"""Unfiltered SQLite pages up to this size are read on the event loop (at most ~0.3 ms)."""


@dataclass
class ImportOptions:
    """What an import request asks for besides the source."""

    model_id: str = ""
    display_name: str = ""
    description: str = ""
    tags: Sequence[str] = ()
    labels: dict[str, str] = field(default_factory=dict)
    parent: str = ""
    training_job: str = ""
    allow_download: bool = False


T = TypeVar("T")


async def _settle(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, whatever its outcome, even when cancelled meanwhile."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({future})


async def _in_thread(cancel: threading.Event, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args)`` on a worker thread.  When the caller is cancelled: set ``cancel`` (work
    that checks it stops), wait for the thread to finish, then raise CancelledError, so
    nothing the thread writes lands after the caller's clean-up."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        await _settle(future)
        raise


class Catalog:
    """Models and workers: the operations behind CatalogService."""

    def __init__(
        self,
        store: CatalogStore,
        settings: CatalogSettings,
        events: ModelEvents | None = None,
        *,
        outcomes: OutcomeStore | None = None,
        dry_run: DryRun | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.events = events or ModelEvents()
        self.outcomes = outcomes or OutcomeStore.of(store)
        self.dry_run = dry_run or DryRun(tls=settings.client_tls(), token=settings.service_token or None)

    # ---- models -------------------------------------------------------------------------------

    async def get_model(self, name: str) -> model_pb2.Model:
        if self.store.local_reads:
            # An indexed SQLite lookup (tens of microseconds) costs less than a thread hop.
            return self.store.get_model(model_id_of(name))
        if self.store.async_reads:
            # PostgreSQL: psycopg's async connection on the loop, no thread hop (`fast_reads`).
            return await self.store.get_model_async(model_id_of(name))
        return await asyncio.to_thread(self.store.get_model, model_id_of(name))

    def _lookup(self, name: str) -> model_pb2.Model | None:
        """Blocking lookup used by compatibility rules (adapter bases)."""
        try:
            return self.store.get_model(model_id_of(name))
        except errors.NotFound:
            return None

    async def create_model(self, model_id: str, model: model_pb2.Model) -> model_pb2.Model:
        created = await asyncio.to_thread(self.store.create_model, model_id, model)
        self.events.publish(model_id, created)
        return created

    async def list_models(
        self, page_size: int, page_token: str, filter: str
    ) -> tuple[list[model_pb2.Model], str]:
        if self.store.local_reads and not filter and page_size <= LOOP_PAGE_MAX:
            # An unfiltered SQLite page (~3 µs an entry) costs less than a thread hop.
            return self.store.list_models(page_size, page_token, filter)
        if self.store.async_reads:
            return await self.store.list_models_async(page_size, page_token, filter)
        return await asyncio.to_thread(self.store.list_models, page_size, page_token, filter)

    async def update_model(self, model: model_pb2.Model, paths: Sequence[str]) -> model_pb2.Model:
        model_id_of(model.name, "model.name")
        updated = await asyncio.to_thread(self.store.update_model, model, list(paths))
        self.events.publish(model_id_of(updated.name), updated)
        return updated

    async def delete_model(self, name: str, *, force: bool, etag: str) -> list[str]:
        model_id = model_id_of(name)
        deleted = await asyncio.to_thread(self.store.delete_model, model_id, force=force, etag=etag)
        for deleted_name in deleted:
            self.events.publish(model_id_of(deleted_name), model_pb2.Model(name=deleted_name), deleted=True)
        return deleted

    async def get_lineage(
        self, name: str
    ) -> tuple[model_pb2.Model, list[model_pb2.Model], list[model_pb2.Model]]:
        model_id = model_id_of(name)
        model = await asyncio.to_thread(self.store.get_model, model_id)
        ancestors, descendants = await asyncio.to_thread(self.store.get_lineage, model_id)
        return model, ancestors, descendants

    # ---- import -------------------------------------------------------------------------------

    async def import_model(self, source: str, options: ImportOptions) -> model_pb2.Model:
        """Import `source` (see the module docstring); returns the READY model."""
        if not source.strip():
            raise errors.InvalidArgument(
                "source is required: a folder, a .safetensors/.gguf file or a hub id org/name[@revision]",
                reason="MISSING_FIELD",
                violations=[errors.FieldViolation("source", "required")],
            )
        resolved = await asyncio.to_thread(
            sources.resolve,
            source.strip(),
            allowed_roots=self.settings.resolved_allowed_roots(),
            cache_dir=self.settings.resolved_hf_cache(),
            allow_download=options.allow_download and self.settings.allow_download,
            allow_pickle=self.settings.allow_pickle,
        )
        parent_name = ""
        if options.parent:
            parent = await self.get_model(options.parent)  # NotFound when absent
            parent_name = parent.name
        entry = model_pb2.Model(
            display_name=options.display_name or resolved.display_name,
            description=options.description,
            author=resolved.author,
            local_path=str(resolved.path),
            state=model_pb2.MODEL_STATE_IMPORTING,
            tags=list(options.tags),
            labels=dict(options.labels),
            parent=parent_name,
        )
        if options.training_job:
            entry.source.fine_tune.training_job = options.training_job
            entry.source.fine_tune.base_model = parent_name
        elif resolved.repo_id:
            entry.source.hugging_face.repo_id = resolved.repo_id
            entry.source.hugging_face.revision = resolved.revision
            entry.source.hugging_face.commit = resolved.commit
        else:
            entry.source.local.path = str(resolved.path)

        cancel = threading.Event()
        creating = asyncio.ensure_future(
            asyncio.to_thread(self._create_entry, entry, options.model_id, resolved)
        )
        try:
            created = await asyncio.shield(creating)
        except asyncio.CancelledError as exc:
            # Cancelled while the row is being written: wait for it, then remove it.
            await _settle(creating)
            if not creating.cancelled() and creating.exception() is None:
                await self._discard_failed(creating.result(), exc)
            raise
        model_id = model_id_of(created.name)
        self.events.publish(model_id, created)
        try:
            return await self._finish_import(created, resolved.path, resolved.hub, cancel)
        except BaseException as exc:
            cancel.set()
            await self._discard_failed(created, exc)
            raise

    def _create_entry(
        self, entry: model_pb2.Model, requested_id: str, resolved: sources.ResolvedSource
    ) -> model_pb2.Model:
        if requested_id:
            entry.version = 1
            return self.store.create_model(requested_id, entry, source_key=resolved.source_key)
        version = self.store.next_version(resolved.source_key)
        base = resolved.suggested_id
        for attempt in range(version, version + 50):
            model_id = base if attempt == 1 else sources.versioned_id(base, attempt)
            entry.version = attempt
            try:
                return self.store.create_model(model_id, entry, source_key=resolved.source_key)
            except errors.AlreadyExists:
                continue
        raise errors.AlreadyExists(f"no free id for {base} after 50 versions", reason="MODEL_ALREADY_EXISTS")

    async def _finish_import(
        self,
        model: model_pb2.Model,
        path: Path,
        hub: model_pb2.HubMetadata | None,
        cancel: threading.Event,
    ) -> model_pb2.Model:
        model_id = model_id_of(model.name)
        files = await _in_thread(cancel, hash_files, path, self.settings.resolved_allowed_roots(), cancel)
        model.files.extend(files)
        model.size_bytes = sum(f.size_bytes for f in files)
        model.state = model_pb2.MODEL_STATE_VALIDATING
        model = await _in_thread(cancel, self.store.save_model, model)
        self.events.publish(model_id, model)

        roots = self.settings.resolved_allowed_roots()
        detection = await _in_thread(cancel, detect, path, allowed_roots=roots)
        detection.apply_to(model)
        if hub is not None and model.HasField("llm"):
            model.llm.hub.CopyFrom(hub)
        if model.HasField("llm") and model.llm.HasField("adapter"):
            await _in_thread(cancel, self._link_adapter_base, model)

        checks = await _in_thread(
            cancel, validation.validate, path, detection, deep=False, allowed_roots=roots
        )
        failed = [c for c in checks if c.outcome == worker_pb2.RULE_OUTCOME_FAIL]
        if failed:
            raise errors.InvalidArgument(
                "validation failed: " + "; ".join(f"{c.check}: {c.message}" for c in failed),
                reason="MODEL_VALIDATION_FAILED",
                metadata={"checks": ",".join(c.check for c in failed)},
            )
        model.state = model_pb2.MODEL_STATE_READY
        model = await _in_thread(cancel, self.store.save_model, model)
        self.events.publish(model_id, model)
        log.info("imported %s (%s) from %s", model.name, model_pb2.ModelKind.Name(model.kind), path)
        return model

    def _link_adapter_base(self, model: model_pb2.Model) -> None:
        """Set an adapter's parent to the catalog entry of its base model, when there is one."""
        adapter = model.llm.adapter
        base_ref = adapter.base_model_name_or_path
        base: model_pb2.Model | None = None
        if model.parent:
            base = self._lookup(model.parent)
        if base is None and base_ref:
            base = self.store.find_by_local_path(str(Path(base_ref).expanduser().resolve()))
        if base is None and base_ref:
            for candidate in self.store.find_by_hub_repo(base_ref):
                base = candidate
                break
        if base is not None:
            adapter.base_model = base.name
            model.parent = model.parent or base.name
            if not model.llm.architecture:
                model.llm.architecture = base.llm.architecture
                model.llm.model_type = base.llm.model_type

    async def _discard_failed(self, model: model_pb2.Model, exc: BaseException) -> None:
        model_id = model_id_of(model.name)
        cancelled = isinstance(exc, asyncio.CancelledError)
        reason = getattr(exc, "reason", "IMPORT_CANCELLED" if cancelled else "IMPORT_FAILED")
        failed = model_pb2.Model()
        failed.CopyFrom(model)
        failed.state = model_pb2.MODEL_STATE_FAILED
        failed.error.reason = reason
        failed.error.message = getattr(
            exc, "message", "import cancelled" if cancelled else "import interrupted"
        )
        self.events.publish(model_id, failed)
        # Shielded, and awaited to the end even when cancelled again: the entry must go.
        deleting = asyncio.ensure_future(
            asyncio.to_thread(self.store.delete_model, model_id, force=True, etag="")
        )
        await _settle(deleting)
        error = None if deleting.cancelled() else deleting.exception()
        if error is not None and not isinstance(error, errors.NotFound):
            # The store is unreachable: the entry stays IMPORTING until the next start
            # marks it FAILED (IMPORT_INTERRUPTED).
            log.warning("could not remove the failed import %s: %s", model.name, error)
            return
        self.events.publish(model_id, failed, deleted=True)
        log.info("import of %s failed (%s); entry removed", model.name, reason)

    # ---- inspection ---------------------------------------------------------------------------

    async def validate_model(self, name: str, *, deep: bool) -> catalog_service_pb2.ValidateModelResponse:
        model = await self.get_model(name)
        path = Path(model.local_path)
        config_field = model.WhichOneof("config")
        stored = getattr(model, config_field) if config_field else None
        # The stored config, so files broken since the import show as failed checks.
        checks = await asyncio.to_thread(
            validation.validate,
            path,
            stored,
            deep=deep,
            allowed_roots=self.settings.resolved_allowed_roots(),
        )
        missing = detection_missing_fields(stored) if stored is not None else []
        response = catalog_service_pb2.ValidateModelResponse(
            valid=all(c.outcome != worker_pb2.RULE_OUTCOME_FAIL for c in checks),
            missing_fields=missing,
        )
        for check in checks:
            response.checks.add(check=check.check, outcome=check.outcome, message=check.message)
        return response

    async def detect_model_type(
        self, *, name: str = "", path: str = ""
    ) -> catalog_service_pb2.DetectModelTypeResponse:
        if name:
            target = Path((await self.get_model(name)).local_path)
        elif path:
            target = await asyncio.to_thread(
                sources.confine, Path(path), self.settings.resolved_allowed_roots()
            )
        else:
            raise errors.InvalidArgument(
                "name or path is required",
                reason="MISSING_FIELD",
                violations=[errors.FieldViolation("target", "set name or path")],
            )
        detection = await asyncio.to_thread(
            detect, target, allowed_roots=self.settings.resolved_allowed_roots()
        )
        response = catalog_service_pb2.DetectModelTypeResponse(kind=detection.kind)
        config = detection.config
        if isinstance(config, model_pb2.LlmConfig):
            response.model_type = config.model_type
            response.architecture = config.architecture
            response.compatible_model_types.extend(config.compatible_model_types)
            response.recommended_model_type = config.model_type if config.compatible_model_types else ""
        elif isinstance(config, model_pb2.ImageConfig):
            response.architecture = config.pipeline_class
        return response

    async def resolve_model(self, reference: str) -> catalog_service_pb2.ResolveModelResponse:
        """Overrides, then the catalog, then the HF cache; NOT_FOUND naming the places looked in."""
        if not reference:
            raise errors.InvalidArgument(
                "model is required",
                reason="MISSING_FIELD",
                violations=[errors.FieldViolation("model", "required")],
            )
        overrides = self.settings.path_overrides()
        if reference in overrides:
            return catalog_service_pb2.ResolveModelResponse(
                local_path=str(overrides[reference]), resolved_from=catalog_service_pb2.RESOLVED_FROM_OVERRIDE
            )
        looked = [f"overrides ({len(overrides)} configured)"]
        if "/" not in reference.removeprefix("models/") or reference.startswith("models/"):
            model = self._lookup(reference)
            looked.append("the catalog")
            if model is not None:
                return catalog_service_pb2.ResolveModelResponse(
                    local_path=model.local_path,
                    resolved_from=catalog_service_pb2.RESOLVED_FROM_CATALOG,
                    name=model.name,
                )
        if (
            "/" in reference
            and not reference.startswith("models/")
            and sources.parse_hub_id(reference) is not None
        ):
            # Only hub ids go to the HF cache: a local path is no model name (it would
            # otherwise be answered as RESOLVED_FROM_HF_CACHE).
            try:
                resolved = await asyncio.to_thread(
                    sources.resolve,
                    reference,
                    allowed_roots=self.settings.resolved_allowed_roots(),
                    cache_dir=self.settings.resolved_hf_cache(),
                    allow_download=False,
                    allow_pickle=True,
                )
            except errors.NotFound as exc:
                looked.append(f"the HF cache {self.settings.resolved_hf_cache()}")
                raise errors.NotFound(
                    f"{reference} not found; looked in: " + ", ".join(looked),
                    reason="MODEL_NOT_RESOLVED",
                    metadata={"model": reference},
                ) from exc
            if resolved.kind in (sources.SourceKind.HF_CACHE, sources.SourceKind.HUB_DOWNLOAD):
                return catalog_service_pb2.ResolveModelResponse(
                    local_path=str(resolved.path), resolved_from=catalog_service_pb2.RESOLVED_FROM_HF_CACHE
                )
        hint = (
            ""
            if sources.parse_hub_id(reference) or "/" not in reference.removeprefix("models/")
            else (" (a path is not a model name: import it, then resolve the name ImportModel gives it)")
        )
        raise errors.NotFound(
            f"{reference} not found; looked in: " + ", ".join(looked) + hint,
            reason="MODEL_NOT_RESOLVED",
            metadata={"model": reference},
        )

    # ---- workers and routing ------------------------------------------------------------------

    async def register_worker(self, worker_id: str, worker: worker_pb2.Worker) -> worker_pb2.Worker:
        return await asyncio.to_thread(self.store.upsert_worker, worker_id, worker)

    async def heartbeat(self, request: catalog_service_pb2.HeartbeatRequest) -> worker_pb2.Worker:
        free = request.free_memory_bytes if request.HasField("free_memory_bytes") else None
        return await asyncio.to_thread(
            self.store.heartbeat,
            worker_id_of(request.name),
            request.load,
            free,
            list(request.loaded_models),
            request.state,
        )

    async def deregister_worker(self, name: str) -> None:
        await asyncio.to_thread(self.store.delete_worker, worker_id_of(name))

    async def get_worker(self, name: str) -> worker_pb2.Worker:
        return await asyncio.to_thread(self.store.get_worker, worker_id_of(name))

    async def list_workers(
        self, page_size: int, page_token: str, filter: str
    ) -> tuple[list[worker_pb2.Worker], str]:
        return await asyncio.to_thread(self.store.list_workers, page_size, page_token, filter)

    async def check_compatibility(
        self,
        model_name: str,
        *,
        worker: str = "",
        engine_spec: worker_pb2.EngineSpec | None = None,
        dry_run: bool = False,
    ) -> worker_pb2.CompatibilityReport:
        """The model against a registered worker or an engine spec, rule by rule.

        With `dry_run` (registered inference workers only), the worker is first
        asked to validate the model with its engines (`catalog_service.dry_run`);
        it records their outcomes here before it answers, so the `observed` rule
        sees them, and its answer is added as a `dry_run` result.
        """
        model = await self.get_model(model_id_of(model_name, "model"))
        target: worker_pb2.Worker | worker_pb2.EngineSpec
        if worker:
            target = await self.get_worker(worker)
        elif engine_spec is not None:
            if dry_run:
                raise _dry_run_refused("an engine_spec is not a worker that can be asked; name a worker")
            target = engine_spec
        else:
            raise errors.InvalidArgument(
                "worker or engine_spec is required",
                reason="MISSING_FIELD",
                violations=[errors.FieldViolation("target", "set worker or engine_spec")],
            )
        tried: worker_pb2.RuleResult | None = None
        if dry_run and isinstance(target, worker_pb2.Worker):
            if target.role != worker_pb2.WORKER_ROLE_INFERENCE:
                role = worker_pb2.WorkerRole.Name(target.role).removeprefix("WORKER_ROLE_").lower()
                raise _dry_run_refused(
                    f"{target.name} is a {role} worker; only inference workers dry-run models"
                )
            tried = await self.dry_run.run(target, model.name)
        report = await asyncio.to_thread(
            compatibility.check,
            model,
            target,
            lookup_model=self._lookup,
            lookup_outcomes=_memoized(self._outcomes_of),
        )
        if tried is not None:
            report.results.append(tried)
            report.verdict = compatibility.verdict_of(report.results)
        return report

    async def find_workers(
        self, model_name: str, role: worker_pb2.WorkerRole.ValueType, *, embeddings: bool = False
    ) -> catalog_service_pb2.FindWorkersResponse:
        model = await self.get_model(model_id_of(model_name, "model"))
        workers = await asyncio.to_thread(self.store.all_workers)
        matches, rejected = await asyncio.to_thread(
            ranking.rank,
            model,
            workers,
            role or None,
            self._lookup,
            lookup_outcomes=_memoized(self._outcomes_of),
            embeddings=embeddings,
        )
        # Each worker is bounded when stored; the answer is bounded too (best matches first,
        # then rejected workers), so many large workers cannot push it past the message limit.
        response = catalog_service_pb2.FindWorkersResponse()
        used = 0
        left_out = 0
        for target, found in ((response.matches, matches), (response.rejected, rejected)):
            for worker, report in found:
                entry = catalog_service_pb2.WorkerMatch(worker=worker, report=report)
                size = entry.ByteSize() + 8  # field tag and length
                if used + size > MAX_FIND_WORKERS_BYTES:
                    left_out += 1
                    continue
                target.append(entry)
                used += size
        if left_out:
            log.warning(
                "FindWorkers for %s left out %d worker(s) to stay under %d bytes",
                model_name,
                left_out,
                MAX_FIND_WORKERS_BYTES,
            )
        return response

    # ---- engine outcomes ----------------------------------------------------------------------

    async def report_engine_outcome(
        self, model_name: str, outcome: worker_pb2.EngineOutcome
    ) -> worker_pb2.EngineOutcome:
        """Record what an engine did with a model (latest per engine, version and device type).

        The outcome is checked (`normalized_outcome`); without a `model_etag`
        it is recorded for the model's current etag. NOT_FOUND for an unknown model.
        """
        model_id = model_id_of(model_name, "model")
        entry = normalized_outcome(outcome)
        return await asyncio.to_thread(self.outcomes.record_outcome, model_id, entry)

    def _outcomes_of(self, name: str) -> list[worker_pb2.EngineOutcome]:
        """Blocking lookup used by the `observed` rule: the outcomes recorded for model `name`."""
        return self.outcomes.outcomes_for(name.removeprefix("models/"))


def _dry_run_refused(why: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(
        f"dry_run needs a registered inference worker: {why}",
        reason="DRY_RUN_UNSUPPORTED_TARGET",
        violations=[errors.FieldViolation("dry_run", "only with a registered inference worker")],
    )
