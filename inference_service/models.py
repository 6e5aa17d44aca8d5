"""Loaded models: load by catalog id, hot-load adapters, unload, admission control.

`ModelManager` owns the engines of this server, one per loaded base model
(`Engine` from `inference_service.engines`), and the LoRA adapters loaded onto
them. Models are resolved through the catalog: the catalog entry gives the
local path, the chat template and sampling defaults. Which engine runs a model
is `EngineSelector`'s answer (`inference_service.engine_selection`): the first
of this server's engines whose compatibility check, dry run, load and first
generation step all pass (FAILED_PRECONDITION with every engine's reason
otherwise).

Embeddings (`embed_target`): a model whose engine computes embeddings (transformers)
is embedded by that engine. Otherwise (vLLM) the model gets an embedding engine of its
own, loaded on the first Embed and kept apart from the generation engine: the first of
this server's engines that compute embeddings (`Engine.supports_embeddings`), chosen by
a second `EngineSelector` over those engines only, with the model's adapters hot-loaded
onto it as they are asked for. A server without such an engine answers UNIMPLEMENTED
``EMBEDDINGS_UNSUPPORTED``. UnloadModel unloads both engines of a model.

Admission: at most `max_concurrent_requests` requests run at once; one more
gets RESOURCE_EXHAUSTED at once rather than queueing without bound.

Engine failures (docs/reliability.md): `supervise` checks every engine twice a
second. An engine that died (vLLM's EngineCore process killed, say) is dropped:
its model is FAILED, the server's health turns NOT_SERVING, requests for it get
UNAVAILABLE (`ENGINE_FAILED`) at once, and it is reloaded in the background with
the same adapters and without asking the catalog (which may be down too); a
reload also runs the first generation step. Once every model serves again,
health is SERVING. After `RELOAD_ATTEMPTS` failed reloads, with back-off, the
model stays FAILED (and health NOT_SERVING, so an orchestrator restarts the
process); `LoadModel` retries, `UnloadModel` gives it up. A reload whose first
step fails because of the model (`ModelUnsupported`) is not retried: the model
is dropped, its outcome reported, and the next request selects an engine anew
(never the one that failed on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from clients.catalog import AsyncCatalogClient, model_name
from clients.errors import ModelyardRpcError
from inference_service.engine_selection import EngineFactory, EngineSelector
from inference_service.engines.base import Engine, ModelUnsupported
from inference_service.engines.image_base import ImageDefaults, ImageEngine
from inference_service.sampling import GenerationDefaults
from modelyard.catalog.v1 import model_pb2, worker_pb2
from server_kit import errors

log = logging.getLogger("modelyard.inference")

ImageEngineFactory = Callable[[model_pb2.Model], ImageEngine]
"""(catalog entry of a full image checkpoint) -> a new, unstarted image engine."""

ENGINE_CHECK_SECONDS = 0.5
"""How often `supervise` looks for dead engines."""
RELOAD_ATTEMPTS = 3
"""Reloads of a model whose engine died before it stays FAILED."""
RELOAD_BACKOFF_SECONDS = 2.0
"""Wait after the first failed reload; doubles after each."""


@dataclass
class LoadedModel:
    """A base model served by one engine, with its adapters."""

    model: model_pb2.Model
    engine: Engine
    defaults: GenerationDefaults
    load_time: float = field(default_factory=time.time)
    adapters: dict[str, model_pb2.Model] = field(default_factory=dict)
    max_model_len: int | None = None
    """The context cap it was loaded with (None: the model's)."""
    outcomes: list[worker_pb2.EngineOutcome] = field(default_factory=list)
    """What each engine tried said when it was loaded (see `EngineSelector`)."""


@dataclass
class FailedModel:
    """A model whose engine died: what it served, why, and whether a reload is under way."""

    loaded: LoadedModel
    message: str
    reloading: bool = True


def _defaults_of(model: model_pb2.Model) -> GenerationDefaults:
    llm = model.llm
    return GenerationDefaults(
        temperature=llm.default_temperature if llm.HasField("default_temperature") else None,
        top_p=llm.default_top_p if llm.HasField("default_top_p") else None,
    )


@dataclass
class LoadedImageModel:
    """An image model served by one image engine, with the image LoRAs added to it."""

    model: model_pb2.Model
    engine: ImageEngine
    load_time: float = field(default_factory=time.time)
    adapters: dict[str, model_pb2.Model] = field(default_factory=dict)


def image_defaults_of(model: model_pb2.Model) -> ImageDefaults:
    """Generation defaults from a catalog entry's `ImageConfig` (None where it says nothing)."""
    image = model.image
    return ImageDefaults(
        steps=image.steps if image.HasField("steps") else None,
        cfg_scale=image.cfg_scale if image.HasField("cfg_scale") else None,
        sampler=image.samplers[0] if image.samplers else None,
        resolution=image.resolution if image.HasField("resolution") else None,
        clip_skip=image.clip_skip if image.HasField("clip_skip") else None,
    )


def _base_label(base: model_pb2.ImageBaseModel.ValueType) -> str:
    from inference_service.engines.diffusers_engine import base_model_label

    return base_model_label(base)


def image_adapter_mismatch(model: model_pb2.Model, adapter: model_pb2.Model) -> str | None:
    """Why the image LoRA `adapter` cannot apply to `model`, or None when the base families
    agree (or one is unknown: diffusers then refuses a LoRA whose layers do not fit)."""
    base, lora_base = model.image.base_model, adapter.image.base_model
    if not base or not lora_base or base == lora_base:
        return None
    return (
        f"LoRA {adapter.name} was trained for {_base_label(lora_base)} and {model.name} is "
        f"{_base_label(base)}: a LoRA applies only to models of the base it was trained for"
    )


def _find(models: dict[str, LoadedModel], name: str) -> tuple[LoadedModel, str | None] | None:
    """(the loaded model, None) for a base `name`, (its base, `name`) for an adapter, else None."""
    if name in models:
        return models[name], None
    for base in models.values():
        if name in base.adapters:
            return base, name
    return None


class KeyedLocks:
    """One asyncio lock per key, kept only while someone holds or waits for it.

    Keys come from requests (model names): a lock per name ever asked for would grow
    without bound with random names, so each entry counts its users and goes away
    with the last one.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Hold the lock of `key` for the block (waiting for the current holder)."""
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


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
        image_engine_factory: ImageEngineFactory | None = None,
    ) -> None:
        self.catalog = catalog
        self.engine_specs = engine_specs
        self.engine_factory = engine_factory
        self.selector = EngineSelector(
            catalog, engine_specs, engine_factory, preferred_engine=preferred_engine
        )
        names = list(engine_specs) if preferred_engine == "auto" else [preferred_engine]
        self.embed_selector = EngineSelector(
            catalog,
            {
                name: engine_specs[name]
                for name in names
                if name in engine_specs and engine_specs[name].capabilities.supports_embeddings
            },
            engine_factory,
        )
        """Chooses the embedding engine of a model whose own engine cannot embed."""
        self._embedders: dict[str, LoadedModel] = {}
        self.load_on_first_use = load_on_first_use
        self.max_concurrent_requests = max_concurrent_requests
        self._loaded: dict[str, LoadedModel] = {}
        self._loading = KeyedLocks()
        self._running = 0
        self.image_engine_factory = image_engine_factory
        self._images: dict[str, LoadedImageModel] = {}
        self._failed: dict[str, FailedModel] = {}
        self._recoveries: dict[str, asyncio.Task[None]] = {}
        self.reload_backoff_seconds = RELOAD_BACKOFF_SECONDS

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

    # ---- load / unload ------------------------------------------------------------------------

    async def load(self, name: str, *, max_model_len: int | None = None) -> LoadedModel:
        """Load a base model, or hot-load an adapter onto its (loaded or auto-loaded) base."""
        name = model_name(name)
        if name in self._loaded:
            return self._loaded[name]
        for loaded in self._loaded.values():
            if name in loaded.adapters:
                return loaded
        if name in self._failed:
            return await self._load_failed(name)
        async with self._loading.hold(name):
            if name in self._loaded:
                return self._loaded[name]
            model = await self._catalog_model(name)
            if model.state != model_pb2.MODEL_STATE_READY:
                raise errors.FailedPrecondition(
                    f"{name} is {model_pb2.ModelState.Name(model.state)}, not READY", reason="MODEL_NOT_READY"
                )
            if model.WhichOneof("config") == "image":
                raise errors.FailedPrecondition(
                    f"{name} is an image model: use GenerateImage",
                    reason="IMAGE_MODEL",
                    metadata={"model": name},
                )
            if model.HasField("llm") and model.llm.HasField("adapter"):
                return await self._load_adapter(model)
            started = time.perf_counter()
            selection = await self.selector.start(model, max_model_len)
            engine_name, engine = selection.engine_name, selection.engine
            assert engine is not None
            loaded = LoadedModel(
                model=model,
                engine=engine,
                defaults=_defaults_of(model),
                max_model_len=max_model_len,
                outcomes=selection.outcomes,
            )
            self._loaded[name] = loaded
            log.info("loaded %s on %s in %.1f s", name, engine_name, time.perf_counter() - started)
            return loaded

    async def validate(
        self, name: str, *, max_model_len: int | None = None
    ) -> tuple[str, str, list[worker_pb2.EngineOutcome]]:
        """`LoadModel(validate_only)`: (the model that would be loaded, for an adapter its base;
        the engine that would serve it; what each engine's dry run said). Nothing is loaded."""
        name = model_name(name)
        for loaded in self._loaded.values():
            if name == loaded.model.name or name in loaded.adapters:
                return loaded.model.name, loaded.engine.name, []
        model = await self._catalog_model(name)
        if model.state != model_pb2.MODEL_STATE_READY:
            raise errors.FailedPrecondition(
                f"{name} is {model_pb2.ModelState.Name(model.state)}, not READY", reason="MODEL_NOT_READY"
            )
        if model.WhichOneof("config") == "image":
            return name, await self.selector.check_rules(model), []
        if model.HasField("llm") and model.llm.HasField("adapter"):
            base_name = model.llm.adapter.base_model or model.parent
            if not base_name:
                raise errors.FailedPrecondition(
                    f"adapter {name} has no base model in the catalog; import its base first",
                    reason="ADAPTER_BASE_UNKNOWN",
                )
            return await self.validate(base_name, max_model_len=max_model_len)
        selection = await self.selector.validate(model, max_model_len)
        assert selection.engine_name is not None
        return name, selection.engine_name, selection.outcomes

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
        """Unload a base model (and its adapters), or one adapter; its embedding engine too."""
        name = model_name(name)
        if await self._unload_image(name):
            return
        if await self._unload_embedder(name) and not self._holds(name):
            return
        failed = name in self._failed
        if failed:
            await self._wait_reload(name)  # a reload under way finishes first: nothing leaks
            self._failed.pop(name, None)
        loaded = self._loaded.pop(name, None)
        if loaded is not None:
            await loaded.engine.close()
            log.info("unloaded %s", name)
            return
        if failed:
            log.info("gave up %s (its engine had died)", name)
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

    def embedders(self) -> list[LoadedModel]:
        """Embedding engines loaded for models whose own engine cannot embed, in load order."""
        return list(self._embedders.values())

    def _holds(self, name: str) -> bool:
        """Whether `name` is loaded (or failed) for generation, as a base model or an adapter."""
        if name in self._loaded or name in self._failed:
            return True
        return any(name in loaded.adapters for loaded in self._loaded.values())

    # ---- embeddings ---------------------------------------------------------------------------

    async def embed_target(self, model: str) -> tuple[LoadedModel, str | None]:
        """The loaded model (and adapter id) an Embed request runs on: the model's own engine
        when it computes embeddings, else the model's embedding engine (see the module doc)."""
        if not model:
            raise errors.InvalidArgument(
                "model is required",
                reason="MISSING_FIELD",
                violations=[errors.FieldViolation("model", "required")],
            )
        name = model_name(model)
        served = _find(self._loaded, name)
        if served is not None and served[0].engine.supports_embeddings:
            return served
        if not self.embed_selector.engine_specs:
            engines = ", ".join(self.selector.candidates())
            raise errors.Unimplemented(
                f"no engine of this worker ({engines}) computes embeddings; use a worker with "
                "the transformers engine",
                reason="EMBEDDINGS_UNSUPPORTED",
                metadata={"engine": served[0].engine.name if served else engines},
            )
        first = self.selector.candidates()[0]
        if served is None and self.engine_specs[first].capabilities.supports_embeddings:
            return await self.target(model)  # the generation engine embeds: one engine for both
        embedded = _find(self._embedders, name)
        if embedded is not None:
            return embedded
        if served is None and not self.load_on_first_use:
            raise errors.NotFound(
                f"{name} is not loaded; call LoadModel first",
                reason="MODEL_NOT_LOADED",
                metadata={"model": name},
            )
        return await self._load_embedder(name)

    async def _load_embedder(self, name: str) -> tuple[LoadedModel, str | None]:
        """Load the embedding engine of `name` (for an adapter: of its base, with the adapter)."""
        async with self._loading.hold(f"embed {name}"):
            embedded = _find(self._embedders, name)
            if embedded is not None:
                return embedded
            model = await self._catalog_model(name)
            if model.state != model_pb2.MODEL_STATE_READY:
                raise errors.FailedPrecondition(
                    f"{name} is {model_pb2.ModelState.Name(model.state)}, not READY", reason="MODEL_NOT_READY"
                )
            if model.WhichOneof("config") == "image":
                raise errors.FailedPrecondition(
                    f"{name} is an image model: it has no text embeddings",
                    reason="IMAGE_MODEL",
                    metadata={"model": name},
                )
            if model.HasField("llm") and model.llm.HasField("adapter"):
                base_name = model.llm.adapter.base_model or model.parent
                if not base_name:
                    raise errors.FailedPrecondition(
                        f"adapter {name} has no base model in the catalog; import its base first",
                        reason="ADAPTER_BASE_UNKNOWN",
                    )
                base, _ = await self._load_embedder(model_name(base_name))
                if not base.engine.supports_lora:
                    raise errors.FailedPrecondition(
                        f"engine {base.engine.name} cannot apply LoRA adapters", reason="LORA_UNSUPPORTED"
                    )
                await base.engine.add_adapter(name, Path(model.local_path))
                base.adapters[name] = model
                return base, name
            started = time.perf_counter()
            selection = await self.embed_selector.start(model, None)
            assert selection.engine is not None
            loaded = LoadedModel(
                model=model,
                engine=selection.engine,
                defaults=_defaults_of(model),
                outcomes=selection.outcomes,
            )
            self._embedders[name] = loaded
            log.info(
                "loaded %s on %s for embeddings in %.1f s",
                name,
                selection.engine_name,
                time.perf_counter() - started,
            )
            return loaded, None

    async def _unload_embedder(self, name: str) -> bool:
        """Unload the embedding engine of `name`, or its adapter `name`; False when neither."""
        loaded = self._embedders.pop(name, None)
        if loaded is not None:
            await loaded.engine.close()
            log.info("unloaded the embedding engine of %s", name)
            return True
        for base in self._embedders.values():
            if name in base.adapters:
                await base.engine.remove_adapter(name)
                del base.adapters[name]
                return True
        return False

    async def target(self, model: str, adapter: str = "") -> tuple[LoadedModel, str | None]:
        """The loaded model (and adapter id) a request runs on, loading them when allowed."""
        if not model:
            raise errors.InvalidArgument(
                "model is required",
                reason="MISSING_FIELD",
                violations=[errors.FieldViolation("model", "required")],
            )
        name = model_name(model)
        self._raise_if_failed(name)
        if adapter:
            self._raise_if_failed(model_name(adapter))
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

    # ---- engine failures ----------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False while the engine of a loaded model has died and it does not serve again yet."""
        return not self._failed

    def failed(self) -> dict[str, str]:
        """Models whose engine died, each with what happened since."""
        return {name: failed.message for name, failed in self._failed.items()}

    def check_engines(self) -> list[str]:
        """Drop every engine that died and start reloading its model; returns those models."""
        dead = [name for name, loaded in self._loaded.items() if not loaded.engine.alive]
        for name in dead:
            loaded = self._loaded.pop(name)
            message = f"the {loaded.engine.name} engine serving {name} died"
            self._failed[name] = FailedModel(loaded, message)
            log.error("%s; reloading it", message)
            self._recoveries[name] = asyncio.create_task(self._recover(name), name=f"reload-{name}")
        return dead

    async def supervise(
        self, report: Callable[[bool], Awaitable[None]], interval: float = ENGINE_CHECK_SECONDS
    ) -> None:
        """Check the engines every `interval` s and `report(healthy)` on each change, until cancelled."""
        healthy = True
        while True:
            self.check_engines()
            if self.healthy != healthy:
                healthy = self.healthy
                await report(healthy)
            await asyncio.sleep(interval)

    def _raise_if_failed(self, name: str) -> None:
        for failed in self._failed.values():
            if name == failed.loaded.model.name or name in failed.loaded.adapters:
                then = "it is being reloaded, retry shortly" if failed.reloading else "LoadModel retries"
                raise errors.Unavailable(
                    f"{failed.message}; {then}",
                    reason="ENGINE_FAILED",
                    metadata={"model": failed.loaded.model.name, "engine": failed.loaded.engine.name},
                )

    async def _recover(self, name: str) -> None:
        failed = self._failed[name]
        with contextlib.suppress(Exception):  # release what is left of the dead engine
            await asyncio.wait_for(failed.loaded.engine.close(), 30)
        for attempt in range(1, RELOAD_ATTEMPTS + 1):
            try:
                await self._reload(failed.loaded)
            except ModelUnsupported as exc:
                # The model kills this engine at its first step: reloading it again would
                # crash again. Drop it; the next request selects an engine anew.
                self._failed.pop(name, None)
                await self.selector.record_unsupported(failed.loaded.model, exc)
                log.error("%s: %s; not reloaded on %s", name, exc.message, exc.engine)
                return
            except Exception as exc:
                failed.message = f"the engine serving {name} died and reload {attempt} failed: {exc}"
                log.warning("%s", failed.message)
                if attempt < RELOAD_ATTEMPTS:
                    await asyncio.sleep(self.reload_backoff_seconds * 2 ** (attempt - 1))
            else:
                log.info("reloaded %s after its engine died", name)
                return
        failed.reloading = False
        log.error("%s stays FAILED after %d reloads; LoadModel retries it", name, RELOAD_ATTEMPTS)

    async def _reload(self, old: LoadedModel) -> LoadedModel:
        """A new engine for `old`'s model and adapters (no catalog call: it may be down too)."""
        name = old.model.name
        async with self._loading.hold(name):
            if name in self._loaded:
                return self._loaded[name]
            engine = self.engine_factory(old.engine.name, Path(old.model.local_path), old.max_model_len)
            try:
                await engine.start()
                await engine.first_step()
                for adapter_name, adapter in old.adapters.items():
                    await engine.add_adapter(adapter_name, Path(adapter.local_path))
            except BaseException:
                with contextlib.suppress(Exception):
                    await engine.close()
                raise
            loaded = LoadedModel(
                model=old.model,
                engine=engine,
                defaults=old.defaults,
                adapters=dict(old.adapters),
                max_model_len=old.max_model_len,
            )
            self._loaded[name] = loaded
            self._failed.pop(name, None)
            return loaded

    async def _wait_reload(self, name: str) -> None:
        task = self._recoveries.get(name)
        if task is not None and not task.done():
            await asyncio.shield(task)

    async def _load_failed(self, name: str) -> LoadedModel:
        """`load` of a model whose engine died: the reload under way, or a new one."""
        failed = self._failed[name]
        task = self._recoveries.get(name)
        if task is not None and not task.done():
            await asyncio.shield(task)
        else:
            await self._reload(failed.loaded)
        loaded = self._loaded.get(name)
        if loaded is None:
            raise errors.Unavailable(failed.message, reason="ENGINE_FAILED", metadata={"model": name})
        return loaded

    # ---- image models -------------------------------------------------------------------------

    def loaded_images(self) -> list[LoadedImageModel]:
        """Loaded image models, in load order."""
        return list(self._images.values())

    async def load_any(
        self, name: str, *, max_model_len: int | None = None
    ) -> LoadedModel | LoadedImageModel:
        """`LoadModel`: an image model (or image LoRA) with `load_image`, anything else with `load`."""
        name = model_name(name)
        if name in self._images or any(name in m.adapters for m in self._images.values()):
            return await self.load_image(name)
        if name not in self._loaded and not any(name in m.adapters for m in self._loaded.values()):
            model = await self._catalog_model(name)
            if model.WhichOneof("config") == "image":
                return await self.load_image(name, model)
        return await self.load(name, max_model_len=max_model_len)

    async def load_image(self, name: str, model: model_pb2.Model | None = None) -> LoadedImageModel:
        """Load a full image checkpoint on an image engine, or an image LoRA onto its parent."""
        name = model_name(name)
        if name in self._images:
            return self._images[name]
        async with self._loading.hold(name):
            if name in self._images:
                return self._images[name]
            if model is None:
                model = await self._catalog_model(name)
            if model.state != model_pb2.MODEL_STATE_READY:
                raise errors.FailedPrecondition(
                    f"{name} is {model_pb2.ModelState.Name(model.state)}, not READY", reason="MODEL_NOT_READY"
                )
            if model.WhichOneof("config") != "image":
                raise errors.FailedPrecondition(
                    f"{name} is not an image model: use Generate or Chat",
                    reason="NOT_AN_IMAGE_MODEL",
                    metadata={"model": name},
                )
            kind = model.image.checkpoint_type
            if kind == model_pb2.CHECKPOINT_TYPE_LORA:
                if not model.parent:
                    raise errors.FailedPrecondition(
                        f"image LoRA {name} has no parent model in the catalog: name it as the adapter of "
                        "GenerateImage on a base model, or import it with a parent",
                        reason="ADAPTER_BASE_UNKNOWN",
                        metadata={"model": name},
                    )
                base = await self.load_image(model.parent)
                await self._add_image_adapter(base, model)
                return base
            if kind != model_pb2.CHECKPOINT_TYPE_CHECKPOINT:
                raise errors.FailedPrecondition(
                    f"{name} is a {model_pb2.CheckpointType.Name(kind).removeprefix('CHECKPOINT_TYPE_')}, "
                    "not a full checkpoint: it cannot generate on its own",
                    reason="NOT_A_PIPELINE",
                    metadata={"model": name},
                )
            engine_name = await self.selector.check_rules(model)
            if self.image_engine_factory is None:
                raise errors.FailedPrecondition(
                    f"engine {engine_name} cannot serve image models here", reason="ENGINE_UNAVAILABLE"
                )
            engine = self.image_engine_factory(model)
            started = time.perf_counter()
            try:
                await engine.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await engine.close()
                raise
            loaded = LoadedImageModel(model=model, engine=engine)
            self._images[name] = loaded
            log.info("loaded %s on %s in %.1f s", name, engine.name, time.perf_counter() - started)
            return loaded

    async def image_target(self, model: str, adapter: str = "") -> tuple[LoadedImageModel, str | None]:
        """The loaded image model (and LoRA id) a GenerateImage request runs on, loading them
        when allowed; FAILED_PRECONDITION `ADAPTER_BASE_MISMATCH` for a LoRA of another base."""
        if not model:
            raise errors.InvalidArgument(
                "model is required",
                reason="MISSING_FIELD",
                violations=[errors.FieldViolation("model", "required")],
            )
        name = model_name(model)
        adapter_name = model_name(adapter) if adapter else None
        loaded = self._images.get(name)
        if loaded is None:
            if not self.load_on_first_use and not any(name in m.adapters for m in self._images.values()):
                raise errors.NotFound(
                    f"{name} is not loaded; call LoadModel first",
                    reason="MODEL_NOT_LOADED",
                    metadata={"model": name},
                )
            loaded = await self.load_image(name)
            if name != loaded.model.name:  # an image LoRA named as the model runs on its parent
                if adapter_name not in (None, name):
                    raise errors.InvalidArgument(
                        f"{name} is a LoRA; name its base as the model to apply {adapter_name}",
                        reason="NOT_A_PIPELINE",
                        violations=[errors.FieldViolation("model", "a LoRA, not a full checkpoint")],
                    )
                adapter_name = name
        if adapter_name is None:
            return loaded, None
        if adapter_name not in loaded.adapters:
            if not self.load_on_first_use:
                raise errors.NotFound(
                    f"adapter {adapter_name} is not loaded on {name}", reason="ADAPTER_NOT_LOADED"
                )
            await self._add_image_adapter(loaded, await self._catalog_model(adapter_name))
        return loaded, adapter_name

    async def _add_image_adapter(self, base: LoadedImageModel, adapter: model_pb2.Model) -> None:
        if adapter.name in base.adapters:
            return
        if (
            adapter.WhichOneof("config") != "image"
            or adapter.image.checkpoint_type != model_pb2.CHECKPOINT_TYPE_LORA
        ):
            raise errors.InvalidArgument(
                f"{adapter.name} is not an image LoRA",
                reason="NOT_AN_ADAPTER",
                violations=[errors.FieldViolation("adapter", "not an image LoRA")],
            )
        if adapter.state != model_pb2.MODEL_STATE_READY:
            raise errors.FailedPrecondition(
                f"{adapter.name} is {model_pb2.ModelState.Name(adapter.state)}, not READY",
                reason="MODEL_NOT_READY",
            )
        problem = image_adapter_mismatch(base.model, adapter)
        if problem is not None:
            raise errors.FailedPrecondition(
                problem,
                reason="ADAPTER_BASE_MISMATCH",
                metadata={
                    "adapter": adapter.name,
                    "adapter_base": model_pb2.ImageBaseModel.Name(adapter.image.base_model),
                    "model": base.model.name,
                    "model_base": model_pb2.ImageBaseModel.Name(base.model.image.base_model),
                },
            )
        await base.engine.add_adapter(adapter.name, Path(adapter.local_path))
        base.adapters[adapter.name] = adapter
        log.info("loaded image LoRA %s onto %s", adapter.name, base.model.name)

    async def _unload_image(self, name: str) -> bool:
        """Unload an image model or image LoRA; False when `name` is neither."""
        loaded = self._images.pop(name, None)
        if loaded is not None:
            await loaded.engine.close()
            log.info("unloaded %s", name)
            return True
        for base in self._images.values():
            if name in base.adapters:
                await base.engine.remove_adapter(name)
                del base.adapters[name]
                return True
        return False

    async def close(self) -> None:
        """Stop reloads and unload everything."""
        for task in self._recoveries.values():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        for name in list(self._loaded):
            loaded = self._loaded.pop(name)
            await loaded.engine.close()
        for name in list(self._images):
            await self._images.pop(name).engine.close()
        for name in list(self._embedders):
            await self._embedders.pop(name).engine.close()
