"""Embeddings end to end: the `Embed` RPC, `modelyard embed` and `/v1/embeddings` with OpenAI's client.

A catalog, an inference worker on the transformers engine (mean-pooled last hidden
states) and the gateway. A model that vLLM serves is embedded in
`test_gateway_embeddings_routing.py`; with only a vLLM worker, `test_gateway_openai.py`
checks that routing refuses (503 `no_compatible_worker`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from clients import cli
from clients.catalog import CatalogClient
from clients.errors import ModelyardRpcError
from clients.inference import InferenceClient
from inference_service.app import InferenceApp
from inference_service.settings import InferenceSettings
from tests.gateway.conftest import ThreadedGateway
from tests.servers import ThreadedServer

HIDDEN_SIZE = 64
"""`tinymodels.llm.build_llm`'s default hidden size: the length of every vector."""


class Stack:
    def __init__(self, root: Path, tiny_llm: Path, tiny_lora: Path) -> None:
        self.catalog = ThreadedServer(
            CatalogApp(
                CatalogSettings(data_dir=root / "catalog", allowed_roots=[tiny_llm.parent, tiny_lora.parent])
            )
        )
        with CatalogClient(self.catalog.target) as client:
            client.import_model(str(tiny_llm), model_id="llama")
            client.import_model(str(tiny_lora), model_id="llama-lora")
        self.inference = ThreadedServer(
            InferenceApp(
                InferenceSettings(
                    data_dir=root / "inference",
                    catalog_address=self.catalog.target,
                    engine="transformers",
                    dtype="float32",
                    worker_id="inference-embed-test",
                )
            )
        )
        self.gateway = ThreadedGateway(self.catalog.target, root / "gateway")
        self.client = self.gateway.client()

    def close(self) -> None:
        self.gateway.stop()
        self.inference.stop()
        self.catalog.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_llm: Path, tiny_lora: Path) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("embeddings"), tiny_llm, tiny_lora)
    try:
        yield running
    finally:
        running.close()


def _norm(vector: list[float]) -> float:
    return math.sqrt(sum(value * value for value in vector))


def test_embeddings_through_the_gateway(stack: Stack) -> None:
    reply = stack.client.embeddings.create(model="llama", input=["a cat", "a dog", "a cat"])
    assert reply.object == "list" and reply.model == "llama"
    assert [item.index for item in reply.data] == [0, 1, 2]
    vectors = [item.embedding for item in reply.data]
    assert all(len(vector) == HIDDEN_SIZE for vector in vectors)
    assert all(abs(_norm(vector) - 1.0) < 1e-4 for vector in vectors)
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-5)
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-3)
    assert reply.usage.prompt_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens

    as_floats = stack.client.embeddings.create(model="llama", input="a cat", encoding_format="float")
    assert as_floats.data[0].embedding == pytest.approx(vectors[0], abs=1e-5)
    raw = stack.client.embeddings.create(model="llama", input="a cat", extra_body={"normalize": False})
    assert abs(_norm(raw.data[0].embedding) - 1.0) > 1e-3
    adapted = stack.client.embeddings.create(model="llama-lora", input="a cat")
    assert adapted.model == "llama-lora"
    assert adapted.data[0].embedding != pytest.approx(vectors[0], abs=1e-4)


def test_embedding_errors(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError):
        stack.client.embeddings.create(model="no-such-model", input="x")
    url = f"{stack.gateway.base_url}/embeddings"
    for body, param in (
        ({"model": "llama", "input": []}, "input"),
        ({"model": "llama", "input": [1, 2, 3]}, "input"),
        ({"model": "llama", "input": "x", "dimensions": 8}, "dimensions"),
        ({"model": "llama", "input": [""]}, "inputs[0]"),
    ):
        answer = httpx.post(url, json=body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["param"] == param, answer.text


def test_embed_rpc_and_cli(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    with InferenceClient(stack.inference.target) as client:
        reply = client.embed("llama", ["hello", "world"], normalize=False, request_id="embed-1")
        assert reply.request_id == "embed-1" and reply.model == "models/llama"
        assert [len(e.values) for e in reply.embeddings] == [HIDDEN_SIZE, HIDDEN_SIZE]
        with pytest.raises(ModelyardRpcError) as empty:
            client.embed("llama", [])
        assert empty.value.code == grpc.StatusCode.INVALID_ARGUMENT and empty.value.reason == "MISSING_FIELD"

    code = cli.main(["embed", "llama", "a cat", "a dog", "--catalog", stack.catalog.target])
    assert code == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert len(lines) == 2 and all(len(line) == HIDDEN_SIZE for line in lines)
    assert abs(_norm(lines[0]) - 1.0) < 1e-4
    assert "2 vectors of 64 dimensions" in captured.err
