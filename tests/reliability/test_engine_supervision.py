"""`ModelManager`'s handling of a dead engine, down to the paths a real crash rarely takes:
reloads that keep failing, `LoadModel` retrying by hand, `UnloadModel` giving a model up.

The engine is the real transformers engine with injected faults: the test marks it dead
(as a killed vLLM EngineCore reports itself) and makes its restarts fail. The end-to-end
crash of a real vLLM engine process is `test_serving_faults.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from clients.catalog import AsyncCatalogClient, CatalogClient
from inference_service.app import engine_specs
from inference_service.engines.base import EngineRequest, SamplingSpec, collect
from inference_service.engines.transformers_engine import TransformersEngine
from inference_service.models import RELOAD_ATTEMPTS, ModelManager
from inference_service.settings import InferenceSettings
from server_kit import errors
from tests.servers import ThreadedServer

MODEL = "models/tiny-llama"


class InjectedFaultsEngine(TransformersEngine):
    """A real transformers engine whose death and failing restarts the test injects."""

    failing_starts = 0
    """Starts still to fail, shared by every instance (the reloads are new instances)."""

    def __init__(self, model_path: Path, max_model_len: int | None) -> None:
        super().__init__(model_path, max_model_len=max_model_len, dtype="float32", device="cpu")
        self.dead = False

    @property
    def alive(self) -> bool:
        return not self.dead

    async def start(self) -> None:
        if InjectedFaultsEngine.failing_starts > 0:
            InjectedFaultsEngine.failing_starts -= 1
            raise errors.FailedPrecondition("injected start failure", reason="ENGINE_START_FAILED")
        await super().start()


@pytest.fixture(scope="module")
def catalog_address(tmp_path_factory: pytest.TempPathFactory, tiny_llm: Path) -> Iterator[str]:
    settings = CatalogSettings(
        data_dir=tmp_path_factory.mktemp("supervision-catalog"), allowed_roots=[tiny_llm.parent]
    )
    server = ThreadedServer(CatalogApp(settings))
    try:
        with CatalogClient(server.target) as catalog:
            catalog.import_model(str(tiny_llm), model_id="tiny-llama")
        yield server.target
    finally:
        server.stop()


async def _generate(manager: ModelManager) -> list[int]:
    loaded, _ = await manager.target(MODEL)
    request = EngineRequest(
        request_id="r", prompt="hello", sampling=SamplingSpec(temperature=0.0, max_tokens=4, ignore_eos=True)
    )
    return (await collect(loaded.engine.generate(request))).completions[0].token_ids


async def _until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    async def wait() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(wait(), timeout)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {timeout} s") from None


async def test_a_dead_engine_is_reloaded_given_up_and_reloaded_by_hand(catalog_address: str) -> None:
    specs = engine_specs(InferenceSettings(engine="transformers"))
    catalog = AsyncCatalogClient(catalog_address)
    manager = ModelManager(
        catalog,
        specs,
        lambda _name, path, max_len: InjectedFaultsEngine(path, max_len),
        preferred_engine="transformers",
    )
    manager.reload_backoff_seconds = 0.01
    reports: list[bool] = []

    async def report(healthy: bool) -> None:
        reports.append(healthy)

    supervisor = asyncio.create_task(manager.supervise(report, interval=0.01))
    try:
        await manager.load(MODEL)
        expected = await _generate(manager)

        # Died, and every reload fails: FAILED for good, requests told so at once.
        InjectedFaultsEngine.failing_starts = RELOAD_ATTEMPTS
        first = manager.loaded()[0].engine
        assert isinstance(first, InjectedFaultsEngine)
        first.dead = True
        await _until(lambda: reports == [False], "health NOT_SERVING")
        await _until(lambda: f"reload {RELOAD_ATTEMPTS} failed" in manager.failed().get(MODEL, ""), "give up")
        assert manager.loaded() == []
        with pytest.raises(errors.Unavailable) as failed:
            await manager.target(MODEL)
        assert failed.value.reason == "ENGINE_FAILED"
        assert "LoadModel retries" in failed.value.message
        await asyncio.sleep(0.05)
        assert reports == [False], "health must stay NOT_SERVING while the model is failed"

        # LoadModel retries by hand: serving again, health SERVING, same answers.
        await manager.load(MODEL)
        await _until(lambda: reports == [False, True], "health SERVING")
        assert await _generate(manager) == expected

        # Died again with restarts failing: UnloadModel gives it up, health SERVING again,
        # and the next request loads it afresh (load on first use).
        InjectedFaultsEngine.failing_starts = 100
        second = manager.loaded()[0].engine
        assert isinstance(second, InjectedFaultsEngine)
        second.dead = True
        await _until(lambda: reports == [False, True, False], "health NOT_SERVING again")
        await manager.unload(MODEL)
        await _until(lambda: reports == [False, True, False, True], "health SERVING after the unload")
        assert manager.failed() == {}
        InjectedFaultsEngine.failing_starts = 0
        assert await _generate(manager) == expected
    finally:
        InjectedFaultsEngine.failing_starts = 0
        supervisor.cancel()
        await manager.close()
        await catalog.close()
