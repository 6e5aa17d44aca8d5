"""The inference service as a `ServiceApp`: engines, model manager, registration."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from grpc import aio
from grpc_health.v1 import health, health_pb2
from prometheus_client.registry import Collector

import server_kit
from clients.catalog import AsyncCatalogClient
from inference_service.engines.base import Engine
from inference_service.engines.diffusers_engine import (
    BaseModel,
    DiffusersEngine,
    parse_single_file_configs,
    single_file_config,
)
from inference_service.metrics import InferenceMetrics
from inference_service.models import ModelManager, image_defaults_of
from inference_service.servicer import InferenceServicer
from inference_service.settings import InferenceSettings
from modelyard.catalog.v1 import catalog_service_pb2, model_pb2, worker_pb2
from modelyard.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from server_kit import capabilities
from server_kit.registration import WorkerRegistration

SERVICE_NAME = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name

log = logging.getLogger("modelyard.inference")


def engine_specs(settings: InferenceSettings) -> dict[str, worker_pb2.EngineSpec]:
    """The engines this server can run, in order of preference, with their capabilities."""
    device = capabilities.describe_device()
    if settings.engine == "auto":
        names = ["vllm", "transformers"] + (["llama-cpp"] if capabilities.llama_cpp_installed() else [])
    else:
        names = [settings.engine]
    specs: dict[str, worker_pb2.EngineSpec] = {}
    for name in names:
        if name == "vllm":
            caps = capabilities.vllm_capabilities(max_lora_rank=settings.max_lora_rank)
            caps.kv_cache_bytes = settings.kv_cache_memory_bytes
        elif name == "transformers":
            caps = capabilities.transformers_capabilities()
        elif name == "llama-cpp":
            caps = capabilities.llama_cpp_capabilities()
        elif name == "diffusers":
            caps = capabilities.diffusers_capabilities(max_lora_rank=settings.max_lora_rank)
        else:
            raise ValueError(f"unknown engine {name!r}: use vllm, transformers, llama-cpp, auto or diffusers")
        caps.allows_remote_code = settings.allow_remote_code
        if settings.max_model_len:
            caps.max_context_length = settings.max_model_len
        specs[name] = worker_pb2.EngineSpec(
            role=worker_pb2.WORKER_ROLE_INFERENCE, capabilities=caps, device=device
        )
    return specs


def make_engine(settings: InferenceSettings, name: str, path: Path, max_model_len: int | None) -> Engine:
    """A new engine `name` for the model at `path`."""
    max_len = max_model_len or settings.max_model_len or None
    if name == "vllm":
        from inference_service.engines.vllm_engine import VllmEngine

        return VllmEngine(
            path,
            max_model_len=max_len,
            kv_cache_memory_bytes=settings.kv_cache_memory_bytes,
            max_num_seqs=settings.max_num_seqs,
            max_lora_rank=settings.max_lora_rank,
            max_loras=settings.max_loras,
            tensor_parallel_size=settings.tensor_parallel_size,
            dtype=settings.dtype,
            enforce_eager=settings.enforce_eager,
            trust_remote_code=settings.allow_remote_code,
        )
    if name == "llama-cpp":
        from inference_service.engines.llama_cpp_engine import LlamaCppEngine

        return LlamaCppEngine(path, max_model_len=max_len)
    from inference_service.engines.transformers_engine import TransformersEngine

    return TransformersEngine(path, max_model_len=max_len, dtype=settings.dtype)


def make_image_engine(
    settings: InferenceSettings, configs: dict[BaseModel, Path], model: model_pb2.Model
) -> DiffusersEngine:
    """A new diffusers engine for the image model `model` (a folder, or a single file loaded
    with the local config folder of its base model from `configs`)."""
    path = Path(model.local_path)
    config = None if path.is_dir() else single_file_config(configs, model.image.base_model, model.name)
    return DiffusersEngine(
        path,
        pipeline_class=model.image.pipeline_class,
        single_file_config=config,
        defaults=image_defaults_of(model),
        dtype=settings.dtype,
        threads=settings.diffusers_threads,
        model_name=model.name,
    )


class InferenceApp:
    """Serves `modelyard.inference.v1.InferenceService`."""

    service_names = (SERVICE_NAME,)

    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings
        self.catalog: AsyncCatalogClient | None = None
        self.manager: ModelManager | None = None
        self.registration: WorkerRegistration | None = None
        self.specs: dict[str, worker_pb2.EngineSpec] = {}
        self.metrics = InferenceMetrics()
        self._health: health.aio.HealthServicer | None = None
        self._supervisor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.specs = await asyncio.to_thread(engine_specs, self.settings)
        configs = parse_single_file_configs(self.settings.diffusers_configs)
        if self.settings.catalog_address:
            self.catalog = AsyncCatalogClient(
                self.settings.catalog_address,
                token=self.settings.service_token or None,
                tls=self.settings.client_tls(),
            )
        self.manager = ModelManager(
            self.catalog,
            self.specs,
            lambda name, path, max_len: make_engine(self.settings, name, path, max_len),
            preferred_engine=self.settings.engine,
            max_concurrent_requests=self.settings.max_concurrent_requests,
            load_on_first_use=self.settings.load_on_first_use,
            image_engine_factory=lambda model: make_image_engine(self.settings, configs, model),
        )

    @property
    def primary_spec(self) -> worker_pb2.EngineSpec:
        """The engine this worker registers as (the first preferred one)."""
        return next(iter(self.specs.values()))

    def server_info(self, worker_id: str = "") -> inference_service_pb2.GetServerInfoResponse:
        spec = self.primary_spec
        return inference_service_pb2.GetServerInfoResponse(
            version=server_kit.__version__,
            worker_id=worker_id,
            capabilities=spec.capabilities,
            device=spec.device,
            max_concurrent_requests=self.settings.max_concurrent_requests,
            engines=[s.capabilities for s in self.specs.values()],
        )

    def add_to_server(self, server: aio.Server) -> None:
        assert self.manager is not None, "start() first"
        self.servicer = InferenceServicer(self.manager, self.server_info(), self.metrics)
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(self.servicer, server)

    def metrics_collectors(self) -> list[Collector]:
        """Tokens, time to first token, queues and KV cache (`inference_service.metrics`)."""
        return self.metrics.collectors(lambda: self.manager)

    def use_health(self, servicer: health.aio.HealthServicer) -> None:
        """The server's health servicer: NOT_SERVING while a dead engine's model is reloaded."""
        self._health = servicer

    async def _report_health(self, healthy: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        if self._health is not None:
            for name in ("", SERVICE_NAME):
                await self._health.set(name, status)

    async def on_serving(self, port: int) -> None:
        assert self.manager is not None
        self._supervisor = asyncio.create_task(self.manager.supervise(self._report_health), name="engines")
        worker_id = self.settings.resolved_worker_id(port)
        self.servicer.server_info.worker_id = worker_id
        self.manager.selector.worker_name = f"workers/{worker_id}"
        self.manager.embed_selector.worker_name = f"workers/{worker_id}"
        if not self.settings.catalog_address:
            return
        self.registration = WorkerRegistration(
            self.settings.catalog_address,
            worker_id,
            lambda: self._describe(port),
            self._heartbeat,
            token=self.settings.service_token or None,
            tls=self.settings.client_tls(),
        )
        await self.registration.start()

    def _describe(self, port: int) -> worker_pb2.Worker:
        """The worker as registered: capabilities plus what it runs now, in one atomic write."""
        spec = self.primary_spec
        beat = self._heartbeat()
        engines = [s.capabilities for s in self.specs.values()]
        worker = worker_pb2.Worker(
            display_name=f"inference ({', '.join(e.engine for e in engines)})",
            address=self.settings.resolved_advertise_address(port),
            role=worker_pb2.WORKER_ROLE_INFERENCE,
            capabilities=spec.capabilities,
            engines=engines if len(engines) > 1 else [],
            device=spec.device,
            loaded_models=beat.loaded_models,
            load=beat.load,
        )
        if beat.HasField("free_memory_bytes"):
            worker.device.free_memory_bytes = beat.free_memory_bytes
        return worker

    def _heartbeat(self) -> catalog_service_pb2.HeartbeatRequest:
        assert self.manager is not None
        request = catalog_service_pb2.HeartbeatRequest(
            load=worker_pb2.WorkerLoad(running=self.manager.running),
            state=worker_pb2.WORKER_STATE_HEALTHY,
        )
        for loaded in self.manager.loaded():
            request.loaded_models.add(model=loaded.model.name, adapters=list(loaded.adapters))
        for image in self.manager.loaded_images():
            request.loaded_models.add(model=image.model.name, adapters=list(image.adapters))
        free = capabilities.free_memory_bytes()
        if free is not None:
            request.free_memory_bytes = free
        return request

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self.registration is not None:
            await self.registration.stop()
        if self.manager is not None:
            await self.manager.close()
        if self.catalog is not None:
            await self.catalog.close()
