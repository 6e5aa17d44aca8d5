"""The inference service through real gRPC servers: catalog + inference (vLLM) + clients."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from clients.catalog import CatalogClient
from inference_service.app import InferenceApp
from inference_service.engines.base import Engine
from inference_service.settings import InferenceSettings
from modelyard.catalog.v1 import worker_pb2
from modelyard.inference.v1 import inference_service_pb2 as pb
from modelyard.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.helpers import grpcurl
from tests.inference.conftest import TEST_KV_CACHE_BYTES
from tests.servers import ThreadedServer
from tinymodels.llm import build_llm, build_lora_adapter


class Suite:
    """A catalog and an inference server (vLLM) on free ports, with models imported."""

    def __init__(self, root: Path, tiny_llm: Path, tiny_lora: Path) -> None:
        other = build_llm(root / "tiny-qwen2", arch="qwen2")
        other_lora = build_lora_adapter(other, root / "tiny-qwen2-lora")
        catalog_settings = CatalogSettings(
            data_dir=root / "catalog",
            allowed_roots=[root, tiny_llm.parent, tiny_lora.parent],
            heartbeat_ttl_seconds=30,
        )
        self.catalog_server = ThreadedServer(CatalogApp(catalog_settings))
        self.catalog = CatalogClient(self.catalog_server.target)
        self.catalog.import_model(str(tiny_llm), model_id="llama")
        self.catalog.import_model(str(tiny_lora), model_id="llama-lora")
        self.catalog.import_model(str(other), model_id="qwen")
        self.catalog.import_model(str(other_lora), model_id="qwen-lora")
        self.app = InferenceApp(
            InferenceSettings(
                data_dir=root / "inference",
                catalog_address=self.catalog_server.target,
                engine="vllm",
                dtype="float32",
                enforce_eager=True,
                kv_cache_memory_bytes=TEST_KV_CACHE_BYTES,
                max_lora_rank=16,
                max_concurrent_requests=24,
                worker_id="inference-test",
            )
        )
        self.inference_server = ThreadedServer(self.app)
        self.channel = grpc.insecure_channel(self.inference_server.target)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)

    def engine(self) -> Engine:
        assert self.app.manager is not None
        return self.app.manager.loaded()[0].engine

    def close(self) -> None:
        self.channel.close()
        self.inference_server.stop()
        self.catalog.close()
        self.catalog_server.stop()


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, tiny_llm: Path, tiny_lora: Path) -> Iterator[Suite]:
    running = Suite(tmp_path_factory.mktemp("suite"), tiny_llm, tiny_lora)
    try:
        # Loading goes through the catalog and its compatibility check.
        loaded = running.stub.LoadModel(pb.LoadModelRequest(model="models/llama"), timeout=300)
        assert loaded.loaded_model.engine == "vllm"
        yield running
    finally:
        running.close()


GREEDY = pb.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_generate_returns_usage_finish_reason_and_request_id(suite: Suite) -> None:
    reply = suite.stub.Generate(
        pb.GenerateRequest(model="models/llama", prompt="hello there", sampling=GREEDY, request_id="req-1"),
        timeout=60,
    )
    assert reply.request_id == "req-1"
    assert reply.model == "models/llama"
    (completion,) = reply.completions
    assert len(completion.token_ids) == 12
    assert completion.finish_reason == pb.FINISH_REASON_LENGTH
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_stream_concatenates_to_the_unary_result(suite: Suite) -> None:
    unary = suite.stub.Generate(
        pb.GenerateRequest(model="models/llama", prompt="stream me", sampling=GREEDY), timeout=60
    ).completions[0]
    deltas = list(
        suite.stub.StreamGenerate(
            pb.StreamGenerateRequest(model="models/llama", prompt="stream me", sampling=GREEDY), timeout=60
        )
    )
    assert len(deltas) > 1
    assert "".join(d.text for d in deltas) == unary.text
    assert [t for d in deltas for t in d.token_ids] == list(unary.token_ids)
    assert deltas[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert deltas[-1].usage.completion_tokens == 12


def test_cancelled_stream_leaves_nothing_in_the_engine(suite: Suite) -> None:
    call = suite.stub.StreamGenerate(
        pb.StreamGenerateRequest(
            model="models/llama",
            prompt="a long story",
            sampling=pb.SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True),
        ),
        timeout=60,
    )
    next(call)  # generation is under way
    call.cancel()
    deadline = time.monotonic() + 10
    while suite.engine().num_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert suite.engine().num_unfinished_requests() == 0
    assert suite.app.manager is not None and suite.app.manager.running == 0


def test_sixteen_concurrent_streams_complete(suite: Suite) -> None:
    def run(i: int) -> int:
        deltas = list(
            suite.stub.StreamGenerate(
                pb.StreamGenerateRequest(
                    model="models/llama",
                    prompt=f"request {i}",
                    sampling=pb.SamplingParams(temperature=0.8, seed=i, max_tokens=16, ignore_eos=True),
                ),
                timeout=120,
            )
        )
        return sum(len(d.token_ids) for d in deltas)

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(run, range(16))) == [16] * 16


def test_lora_changes_output_mixes_with_base_and_wrong_base_is_refused(suite: Suite) -> None:
    def generate(adapter: str = "") -> str:
        request = pb.GenerateRequest(
            model="models/llama", adapter=adapter, prompt="the adapter", sampling=GREEDY
        )
        return str(suite.stub.Generate(request, timeout=60).completions[0].text)

    base = generate()
    tuned = generate("models/llama-lora")  # hot-loaded from the catalog on first use
    assert tuned != base
    with ThreadPoolExecutor(4) as pool:
        mixed = list(pool.map(generate, ["", "models/llama-lora", "", "models/llama-lora"]))
    assert mixed == [base, tuned, base, tuned]
    loaded = suite.stub.ListLoadedModels(pb.ListLoadedModelsRequest(), timeout=10).loaded_models
    assert list(loaded[0].adapters) == ["models/llama-lora"]

    with pytest.raises(grpc.RpcError) as caught:
        generate("models/qwen-lora")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "models/qwen" in caught.value.details()


def test_chat_uses_the_model_template(suite: Suite, tiny_llm: Path) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "hi"}]
    rendered = AutoTokenizer.from_pretrained(tiny_llm).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    expected = suite.stub.Generate(
        pb.GenerateRequest(
            model="models/llama",
            prompt_token_ids=pb.TokenIds(
                ids=AutoTokenizer.from_pretrained(tiny_llm).encode(rendered, add_special_tokens=False)
            ),
            sampling=GREEDY,
        ),
        timeout=60,
    ).completions[0]
    chat = suite.stub.Chat(
        pb.ChatRequest(
            model="models/llama", messages=[pb.ChatMessage(role="user", content="hi")], sampling=GREEDY
        ),
        timeout=60,
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected.text
    streamed = list(
        suite.stub.StreamChat(
            pb.StreamChatRequest(
                model="models/llama", messages=[pb.ChatMessage(role="user", content="hi")], sampling=GREEDY
            ),
            timeout=60,
        )
    )
    assert "".join(d.content for d in streamed) == expected.text


def test_bad_requests_get_clear_statuses(suite: Suite) -> None:
    from clients.errors import ModelyardRpcError

    def error_of(request: pb.GenerateRequest) -> ModelyardRpcError:
        with pytest.raises(grpc.RpcError) as caught:
            suite.stub.Generate(request, timeout=60)
        return ModelyardRpcError.from_rpc_error(caught.value)

    unknown = error_of(pb.GenerateRequest(model="models/nope", prompt="x"))
    assert unknown.code == grpc.StatusCode.NOT_FOUND
    bad = error_of(
        pb.GenerateRequest(
            model="models/llama", prompt="x", sampling=pb.SamplingParams(top_p=1.5, temperature=-1)
        )
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in bad.field_violations} == {"sampling.top_p", "sampling.temperature"}
    long = error_of(pb.GenerateRequest(model="models/llama", prompt="word " * 400))
    assert long.code == grpc.StatusCode.INVALID_ARGUMENT
    assert long.reason == "PROMPT_TOO_LONG"
    assert long.metadata["max_model_len"] == "256"


def test_too_many_requests_are_refused_not_queued(suite: Suite) -> None:
    manager = suite.app.manager
    assert manager is not None
    limit = manager.max_concurrent_requests
    manager.max_concurrent_requests = 1
    try:
        call = suite.stub.StreamGenerate(
            pb.StreamGenerateRequest(
                model="models/llama",
                prompt="hold",
                sampling=pb.SamplingParams(max_tokens=200, ignore_eos=True),
            ),
            timeout=60,
        )
        next(call)
        with pytest.raises(grpc.RpcError) as caught:
            suite.stub.Generate(pb.GenerateRequest(model="models/llama", prompt="x"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        call.cancel()
    finally:
        manager.max_concurrent_requests = limit


def test_server_info_and_registration(suite: Suite) -> None:
    info = suite.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert info.capabilities.engine == "vllm"
    assert "LlamaForCausalLM" in info.capabilities.architectures
    assert info.worker_id == "inference-test"
    assert [m.model for m in info.loaded_models] == ["models/llama"]

    registration = suite.app.registration
    assert registration is not None
    suite.inference_server.run(registration.beat())  # heartbeat now rather than waiting for one
    worker = suite.catalog.get_worker("inference-test")
    assert worker.role == worker_pb2.WORKER_ROLE_INFERENCE
    assert worker.address == suite.app.settings.resolved_advertise_address(suite.inference_server.server.port)
    assert [m.model for m in worker.loaded_models] == ["models/llama"]
    found = suite.catalog.find_workers("llama", worker_pb2.WORKER_ROLE_INFERENCE)
    assert [m.worker.name for m in found.matches] == ["workers/inference-test"]


def test_grpcurl_streams_generate(suite: Suite) -> None:
    body = {
        "model": "models/llama",
        "prompt": "hi",
        "sampling": {"temperature": 0, "maxTokens": 5, "ignoreEos": True},
    }
    result = grpcurl(
        suite.inference_server.target,
        "modelyard.inference.v1.InferenceService/StreamGenerate",
        data=json.dumps(body),
    )
    assert result.returncode == 0, result.stderr
    messages = [
        json.loads(chunk) for chunk in result.stdout.replace("}\n{", "}\x00{").split("\x00") if chunk.strip()
    ]
    assert len(messages) >= 2
    # grpcurl 1.8 prints the proto field names.
    assert [m["finish_reason"] for m in messages if "finish_reason" in m] == ["FINISH_REASON_LENGTH"]
    assert messages[-1]["usage"]["completion_tokens"] == 5
    assert sum(len(m.get("token_ids", [])) for m in messages) == 5


def test_unload_frees_the_model(suite: Suite) -> None:
    suite.stub.LoadModel(pb.LoadModelRequest(model="models/qwen"), timeout=300)
    names = [
        m.model for m in suite.stub.ListLoadedModels(pb.ListLoadedModelsRequest(), timeout=10).loaded_models
    ]
    assert "models/qwen" in names
    suite.stub.UnloadModel(pb.UnloadModelRequest(model="models/qwen"), timeout=60)
    names = [
        m.model for m in suite.stub.ListLoadedModels(pb.ListLoadedModelsRequest(), timeout=10).loaded_models
    ]
    assert "models/qwen" not in names
    with pytest.raises(grpc.RpcError) as caught:
        suite.stub.UnloadModel(pb.UnloadModelRequest(model="models/qwen"), timeout=60)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
