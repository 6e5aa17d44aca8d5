"""Chat templates render off the event loop, within a size and time budget (issue 14, 3a).

One catalog and one inference server (transformers engine, the tiny Llama loaded).
A template that renders without end must neither stall the server's other RPCs
(GetServerInfo, health) nor run forever: INVALID_ARGUMENT
``CHAT_TEMPLATE_BUDGET_EXCEEDED``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from clients.catalog import CatalogClient
from clients.errors import ModelyardRpcError
from inference_service.app import InferenceApp
from inference_service.chat import RenderBudget, render_chat
from inference_service.engines.base import Tokenizer
from inference_service.settings import InferenceSettings
from modelyard.inference.v1 import inference_service_pb2 as pb
from modelyard.inference.v1 import inference_service_pb2_grpc as pb_grpc
from server_kit.errors import InvalidArgument
from tests.helpers import health_status
from tests.servers import ThreadedServer
from tinymodels.llm import build_llm

ENDLESS_OUTPUT = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
"""10**10 characters (the sandbox caps one range at 100000, not nested ones)."""

ENDLESS_SILENT = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% set y = j %}{% endfor %}{% endfor %}"
    "{{ messages[0].content }}"
)
"""10**10 iterations printing nothing until the end."""


class Served:
    def __init__(self, root: Path) -> None:
        model = build_llm(root / "tiny-llama", arch="llama")
        self.catalog_server = ThreadedServer(
            CatalogApp(CatalogSettings(data_dir=root / "catalog", allowed_roots=[root]))
        )
        with CatalogClient(self.catalog_server.target) as catalog:
            catalog.import_model(str(model), model_id="llama")
        self.server = ThreadedServer(
            InferenceApp(
                InferenceSettings(
                    data_dir=root / "inference",
                    catalog_address=self.catalog_server.target,
                    engine="transformers",
                    dtype="float32",
                    worker_id="inference-chat-budget",
                )
            )
        )
        self.channel = grpc.insecure_channel(self.server.target)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.stub.LoadModel(pb.LoadModelRequest(model="models/llama"), timeout=300)

    def close(self) -> None:
        self.channel.close()
        self.server.stop()
        self.catalog_server.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    running = Served(tmp_path_factory.mktemp("chat-budget"))
    try:
        yield running
    finally:
        running.close()


def _chat(served: Served, template: str) -> ModelyardRpcError:
    request = pb.ChatRequest(
        model="models/llama",
        messages=[pb.ChatMessage(role="user", content="hi")],
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=2),
        chat_template=template,
    )
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.Chat(request, timeout=60)
    return ModelyardRpcError.from_rpc_error(caught.value)


@pytest.mark.parametrize(
    ("template", "limit"), [(ENDLESS_OUTPUT, "size"), (ENDLESS_SILENT, "time")], ids=["size", "time"]
)
def test_endless_template_neither_stalls_the_server_nor_runs_forever(
    served: Served, template: str, limit: str
) -> None:
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        pending = pool.submit(_chat, served, template)
        time.sleep(0.2)  # the template is rendering now
        latencies = []
        while not pending.done():
            begin = time.monotonic()
            served.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            assert health_status(served.server.target) == 1  # SERVING
            latencies.append(time.monotonic() - begin)
            time.sleep(0.05)
        error = pending.result()
    assert time.monotonic() - started < 10
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "CHAT_TEMPLATE_BUDGET_EXCEEDED"
    assert error.metadata["limit"] == limit
    assert "chat template was stopped" in error.message
    assert max(latencies, default=0.0) < 1.0, latencies
    # The server still chats afterwards.
    reply = served.stub.Chat(
        pb.ChatRequest(
            model="models/llama",
            messages=[pb.ChatMessage(role="user", content="hi")],
            sampling=pb.SamplingParams(temperature=0.0, max_tokens=2),
        ),
        timeout=60,
    )
    assert reply.choices


def test_render_budget_bounds_size_and_time(tiny_llm: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = Tokenizer(AutoTokenizer.from_pretrained(tiny_llm))
    hi = [{"role": "user", "content": "hi"}]
    plain = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert render_chat(tokenizer, hi, template=plain, budget=RenderBudget(max_chars=2)) == "hi"
    with pytest.raises(InvalidArgument) as too_big:
        render_chat(tokenizer, hi, template=plain, budget=RenderBudget(max_chars=1))
    assert too_big.value.reason == "CHAT_TEMPLATE_BUDGET_EXCEEDED"
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as too_slow:
        render_chat(tokenizer, hi, template=ENDLESS_SILENT, budget=RenderBudget(seconds=0.3))
    assert too_slow.value.reason == "CHAT_TEMPLATE_BUDGET_EXCEEDED"
    assert time.monotonic() - started < 3
    assert RenderBudget.for_context(256).max_chars == 64 * 1024
    assert RenderBudget.for_context(10**9).max_chars == RenderBudget().max_chars
