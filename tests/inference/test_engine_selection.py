"""Failures classified, never looped: a model that kills vLLM at its first generation step.

The worker's two early warnings are switched off here to reach the last line of defence:
its vLLM spec reports no attention head sizes (as a vLLM that cannot tell them would), and
its vLLM engines skip their dry run (`FirstStepOnlyVllmEngine`). Everything else is real:
a catalog server, vLLM on the CPU, a Qwen2-style model with head size 16 that vLLM's CPU
attention refuses at the first forward step, killing its EngineCore process.

What must hold: the load is answered once with FAILED_PRECONDITION
`MODEL_UNSUPPORTED_BY_ENGINE` naming what the engine did; the outcome is recorded in the
catalog, whose `observed` rule then refuses the pair; the engine is never started again
for that model; a worker that also has transformers serves the model there; and the
worker goes on serving other models on vLLM.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from clients.catalog import AsyncCatalogClient, CatalogClient
from inference_service.app import engine_specs, make_engine
from inference_service.engines.base import Engine, EngineRequest, SamplingSpec, collect
from inference_service.engines.vllm_engine import VllmEngine
from inference_service.models import ModelManager
from inference_service.settings import InferenceSettings
from modelyard.catalog.v1 import worker_pb2
from server_kit import errors
from tests.inference.conftest import TEST_KV_CACHE_BYTES
from tests.servers import ThreadedServer
from tinymodels.llm import build_llm

HEAD16 = "models/qwen-head16"
LLAMA = "models/llama"


class FirstStepOnlyVllmEngine(VllmEngine):
    """The real vLLM engine with its dry run switched off (so the first step must catch it)."""

    def dry_run(self) -> None:
        return None


@pytest.fixture(scope="module")
def catalog_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("selection")
    head16 = build_llm(root / "qwen-head16", "qwen2", num_heads=4, num_kv_heads=2)
    llama = build_llm(root / "llama", "llama")
    server = ThreadedServer(CatalogApp(CatalogSettings(data_dir=root / "catalog", allowed_roots=[root])))
    try:
        with CatalogClient(server.target) as catalog:
            catalog.import_model(str(head16), model_id="qwen-head16")
            catalog.import_model(str(llama), model_id="llama")
        yield server.target
    finally:
        server.stop()


@pytest.fixture
async def catalog(catalog_address: str) -> AsyncIterator[AsyncCatalogClient]:
    client = AsyncCatalogClient(catalog_address)
    try:
        yield client
    finally:
        await client.close()


def _settings(tmp_path: Path, engine: str) -> InferenceSettings:
    return InferenceSettings(
        data_dir=tmp_path,
        engine=engine,
        kv_cache_memory_bytes=TEST_KV_CACHE_BYTES,
        enforce_eager=True,
        max_num_seqs=4,
    )


def _manager(
    catalog: AsyncCatalogClient, settings: InferenceSettings, started: Counter[str]
) -> tuple[ModelManager, dict[str, worker_pb2.EngineSpec]]:
    specs = engine_specs(settings)
    specs["vllm"].capabilities.ClearField("attention_head_sizes")  # the engine "cannot tell"

    def factory(name: str, path: Path, max_len: int | None) -> Engine:
        started[name] += 1
        if name == "vllm":
            return FirstStepOnlyVllmEngine(
                path, kv_cache_memory_bytes=TEST_KV_CACHE_BYTES, enforce_eager=True
            )
        return make_engine(settings, name, path, max_len)

    manager = ModelManager(catalog, specs, factory, preferred_engine=settings.engine)
    manager.selector.worker_name = "workers/selection-test"
    return manager, specs


async def _generate(manager: ModelManager, model: str) -> str:
    loaded, _ = await manager.target(model)
    request = EngineRequest(request_id=f"t-{model}", prompt="Hello", sampling=SamplingSpec(max_tokens=4))
    return (await collect(loaded.engine.generate(request))).completions[0].text


async def test_a_first_step_failure_is_answered_once_recorded_and_never_retried(
    catalog: AsyncCatalogClient, tmp_path: Path
) -> None:
    started: Counter[str] = Counter()
    manager, specs = _manager(catalog, _settings(tmp_path, "vllm"), started)
    try:
        # Nothing warns before the load: the rules pass without the head-size fact.
        report = await catalog.check_compatibility(HEAD16, engine_spec=specs["vllm"])
        assert report.verdict != worker_pb2.VERDICT_INCOMPATIBLE

        with pytest.raises(errors.FailedPrecondition) as failed:
            await manager.load(HEAD16)
        assert failed.value.reason == "MODEL_UNSUPPORTED_BY_ENGINE"
        assert "first step" in failed.value.message
        assert started["vllm"] == 1

        # Recorded: the catalog now refuses the pair, with the engine's words.
        report = await catalog.check_compatibility(HEAD16, engine_spec=specs["vllm"])
        observed = next(r for r in report.results if r.rule == "observed")
        assert observed.outcome == worker_pb2.RULE_OUTCOME_FAIL
        assert "first generation step" in observed.message and "workers/selection-test" in observed.message

        # Asked again: the same answer at once, and no engine is started for it.
        with pytest.raises(errors.FailedPrecondition) as again:
            await manager.load(HEAD16)
        assert again.value.reason == "MODEL_UNSUPPORTED_BY_ENGINE"
        assert started["vllm"] == 1
        assert manager.healthy and manager.failed() == {}

        # The worker goes on serving other models on vLLM.
        assert await _generate(manager, LLAMA)
        assert started["vllm"] == 2
    finally:
        await manager.close()


async def test_a_worker_with_transformers_serves_the_model_vllm_failed_on(
    catalog: AsyncCatalogClient, tmp_path: Path
) -> None:
    """After the outcome above (or on the first try, when none was recorded yet), the `auto`
    worker serves the model on transformers without starting vLLM for it again."""
    started: Counter[str] = Counter()
    manager, _ = _manager(catalog, _settings(tmp_path, "auto"), started)
    try:
        assert await _generate(manager, HEAD16)
        assert [m.engine.name for m in manager.loaded()] == ["transformers"]
        assert started == Counter({"transformers": 1})  # the catalog's record spared vLLM a crash
        outcomes = manager.loaded()[0].outcomes
        assert [(o.engine, o.supported) for o in outcomes] == [("transformers", True)]
    finally:
        await manager.close()
