"""Embeddings of a model that vLLM serves: routing that knows which workers can embed.

A catalog, a vLLM-only worker (it cannot embed), a default worker (`engine="auto"`:
vLLM, then transformers) whose generation engine for the model is vLLM, and the
gateway. `/v1/embeddings` and `modelyard embed` must reach the default worker, which
embeds with a transformers engine loaded for the model next to its vLLM engine; the
vLLM-only worker is never asked (FindWorkers with `embeddings` rejects it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from clients import cli
from clients.catalog import CatalogClient
from clients.errors import ModelyardRpcError
from clients.inference import InferenceClient
from inference_service.app import InferenceApp
from inference_service.settings import InferenceSettings
from modelyard.catalog.v1 import worker_pb2
from tests.gateway.conftest import ThreadedGateway
from tests.inference.conftest import TEST_KV_CACHE_BYTES
from tests.servers import ThreadedServer

pytestmark = pytest.mark.slow

HIDDEN_SIZE = 64
"""`tinymodels.llm.build_llm`'s default hidden size: the length of every vector."""


def _inference(root: Path, catalog: str, engine: str, worker_id: str) -> InferenceApp:
    return InferenceApp(
        InferenceSettings(
            data_dir=root / worker_id,
            catalog_address=catalog,
            engine=engine,
            dtype="float32",
            enforce_eager=True,
            kv_cache_memory_bytes=TEST_KV_CACHE_BYTES,
            max_lora_rank=16,
            worker_id=worker_id,
        )
    )


class Fleet:
    def __init__(self, root: Path, tiny_llm: Path, tiny_lora: Path) -> None:
        self.catalog = ThreadedServer(
            CatalogApp(
                CatalogSettings(data_dir=root / "catalog", allowed_roots=[tiny_llm.parent, tiny_lora.parent])
            )
        )
        with CatalogClient(self.catalog.target) as client:
            client.import_model(str(tiny_llm), model_id="llama")
            client.import_model(str(tiny_lora), model_id="llama-lora")
        self.vllm_app = _inference(root, self.catalog.target, "vllm", "a-vllm-only")
        self.vllm_only = ThreadedServer(self.vllm_app)
        self.auto_app = _inference(root, self.catalog.target, "auto", "b-auto")
        self.auto = ThreadedServer(self.auto_app)
        self.gateway = ThreadedGateway(self.catalog.target, root / "gateway")
        self.client = self.gateway.client()

    def close(self) -> None:
        self.gateway.stop()
        self.auto.stop()
        self.vllm_only.stop()
        self.catalog.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_llm: Path, tiny_lora: Path) -> Iterator[Fleet]:
    running = Fleet(tmp_path_factory.mktemp("embeddings-routing"), tiny_llm, tiny_lora)
    try:
        yield running
    finally:
        running.close()


def _norm(vector: list[float]) -> float:
    return math.sqrt(sum(value * value for value in vector))


def test_registration_says_which_engines_embed(fleet: Fleet) -> None:
    with CatalogClient(fleet.catalog.target) as client:
        workers = {w.name: w for w in client.list_workers()}
        auto = workers["workers/b-auto"]
        assert [(e.engine, e.supports_embeddings) for e in auto.engines][:2] == [
            ("vllm", False),
            ("transformers", True),
        ]
        assert not workers["workers/a-vllm-only"].capabilities.supports_embeddings
        found = client.find_workers("llama", worker_pb2.WORKER_ROLE_INFERENCE, embeddings=True)
        assert [m.worker.name for m in found.matches] == ["workers/b-auto"]
        assert found.matches[0].report.engine == "transformers"
        assert [m.worker.name for m in found.rejected] == ["workers/a-vllm-only"]
        assert "computes embeddings" in found.rejected[0].report.results[-1].message
    # Asked directly, the vLLM-only worker refuses at once (it loads nothing).
    with InferenceClient(fleet.vllm_only.target) as worker, pytest.raises(ModelyardRpcError) as caught:
        worker.embed("llama", ["hello"])
    assert caught.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert caught.value.reason == "EMBEDDINGS_UNSUPPORTED"
    assert fleet.vllm_app.manager is not None and fleet.vllm_app.manager.loaded() == []


def test_a_vllm_served_model_is_embedded_through_the_gateway_and_the_cli(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    # The default worker's generation engine for llama is vLLM.
    with InferenceClient(fleet.auto.target) as worker:
        assert worker.generate("llama", "Once upon a time", max_tokens=2).completions
    manager = fleet.auto_app.manager
    assert manager is not None
    assert [(m.model.name, m.engine.name) for m in manager.loaded()] == [("models/llama", "vllm")]

    reply = fleet.client.embeddings.create(model="llama", input=["a cat", "a dog", "a cat"])
    vectors = [item.embedding for item in reply.data]
    assert reply.model == "llama" and [len(v) for v in vectors] == [HIDDEN_SIZE] * 3
    assert all(abs(_norm(v) - 1.0) < 1e-4 for v in vectors)
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-5)
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-3)
    assert reply.usage.prompt_tokens > 0

    # Embedded by a transformers engine loaded for it, next to (not instead of) vLLM.
    assert [(m.model.name, m.engine.name) for m in manager.loaded()] == [("models/llama", "vllm")]
    assert [(m.model.name, m.engine.name) for m in manager.embedders()] == [("models/llama", "transformers")]
    assert fleet.vllm_app.manager is not None and fleet.vllm_app.manager.loaded() == []

    adapted = fleet.client.embeddings.create(model="llama-lora", input="a cat")
    assert len(adapted.data[0].embedding) == HIDDEN_SIZE
    assert adapted.data[0].embedding != pytest.approx(vectors[0], abs=1e-4)
    assert manager.embedders()[0].adapters.keys() == {"models/llama-lora"}

    capsys.readouterr()  # what the engines printed so far
    code = cli.main(["embed", "llama", "a cat", "--catalog", fleet.catalog.target])
    assert code == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines() if line.startswith("[")]
    assert len(lines) == 1, captured.out and len(lines[0]) == HIDDEN_SIZE
    assert lines[0] == pytest.approx(vectors[0], abs=1e-5)
    assert fleet.auto.target.rsplit(":", 1)[1] in captured.err

    with InferenceClient(fleet.auto.target) as worker:
        listed = {(m.model, m.engine) for m in worker.list_loaded_models()}
        assert listed == {("models/llama", "vllm"), ("models/llama", "transformers")}
        worker.unload_model("llama")
    assert manager.loaded() == [] and manager.embedders() == []
