"""The gateway with OpenAI's own client, in front of a real catalog and a vLLM inference worker.

The worker allows one request at a time (`max_concurrent_requests=1`), so a second
concurrent stream is the 429 case; tests run one after the other otherwise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from clients.catalog import CatalogClient
from inference_service.app import InferenceApp
from inference_service.settings import InferenceSettings
from tests.gateway.conftest import ThreadedGateway
from tests.inference.conftest import TEST_KV_CACHE_BYTES
from tests.servers import ThreadedServer

pytestmark = pytest.mark.slow

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]
GREEDY: dict[str, Any] = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


class Suite:
    """Catalog, inference (vLLM, metrics on) and the gateway, with llama and its LoRA imported."""

    def __init__(self, root: Path, tiny_llm: Path, tiny_lora: Path) -> None:
        self.catalog = ThreadedServer(
            CatalogApp(
                CatalogSettings(data_dir=root / "catalog", allowed_roots=[tiny_llm.parent, tiny_lora.parent])
            )
        )
        with CatalogClient(self.catalog.target) as client:
            client.import_model(str(tiny_llm), model_id="llama")
            client.import_model(str(tiny_lora), model_id="llama-lora")
        self.app = InferenceApp(
            InferenceSettings(
                data_dir=root / "inference",
                catalog_address=self.catalog.target,
                engine="vllm",
                dtype="float32",
                enforce_eager=True,
                kv_cache_memory_bytes=TEST_KV_CACHE_BYTES,
                max_lora_rank=16,
                max_concurrent_requests=1,
                worker_id="inference-gateway-test",
            )
        )
        self.inference = ThreadedServer(self.app, metrics_listen="127.0.0.1:0")
        self.gateway = ThreadedGateway(self.catalog.target, root / "gateway")
        self.client = self.gateway.client()

    def running(self) -> int:
        assert self.app.manager is not None
        return self.app.manager.running

    def handled(self, method: str, code: str) -> float:
        """`modelyard_grpc_server_handled_total` of the inference server for `method` and `code`."""
        metrics = self.inference.server.metrics
        assert metrics is not None
        value = metrics.registry.get_sample_value(
            "modelyard_grpc_server_handled_total",
            {
                "grpc_service": "modelyard.inference.v1.InferenceService",
                "grpc_method": method,
                "grpc_type": "server_stream",
                "grpc_code": code,
            },
        )
        return value or 0.0

    def close(self) -> None:
        self.gateway.stop()
        self.inference.stop()
        self.catalog.stop()


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, tiny_llm: Path, tiny_lora: Path) -> Iterator[Suite]:
    running = Suite(tmp_path_factory.mktemp("gateway"), tiny_llm, tiny_lora)
    try:
        yield running
    finally:
        running.close()


def test_completion_unary_loads_on_demand_and_reports_usage(suite: Suite) -> None:
    reply = suite.client.completions.create(model="llama", prompt="Once upon a time", max_tokens=12, **GREEDY)
    assert reply.object == "text_completion" and reply.model == "llama"
    (choice,) = reply.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert reply.usage is not None and reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    assert reply.id.startswith("cmpl-")


def test_completion_stream_concatenates_to_the_unary_text(suite: Suite) -> None:
    unary = suite.client.completions.create(model="llama", prompt="stream me", max_tokens=12, **GREEDY)
    chunks = list(
        suite.client.completions.create(
            model="llama",
            prompt="stream me",
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    texts = [choice.text for chunk in chunks for choice in chunk.choices]
    assert len(texts) > 1
    assert "".join(texts) == unary.choices[0].text
    finishes = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


def test_completion_logprobs(suite: Suite) -> None:
    reply = suite.client.completions.create(model="llama", prompt="hi", max_tokens=5, logprobs=1, **GREEDY)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.token_logprobs is not None
    assert len(logprobs.tokens) == 5 and all(value <= 0 for value in logprobs.token_logprobs)
    assert "".join(logprobs.tokens) == reply.choices[0].text


def test_chat_unary_and_streamed_agree(suite: Suite) -> None:
    unary = suite.client.chat.completions.create(
        model="llama", messages=HI, max_completion_tokens=10, **GREEDY
    )
    assert unary.object == "chat.completion"
    message = unary.choices[0].message
    assert message.role == "assistant" and message.content
    assert unary.usage is not None and unary.usage.completion_tokens == 10
    chunks = list(
        suite.client.chat.completions.create(
            model="llama",
            messages=HI,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)


def test_adapter_by_name_runs_on_its_base(suite: Suite) -> None:
    base = suite.client.chat.completions.create(model="llama", messages=HI, max_tokens=12, **GREEDY)
    adapted = suite.client.chat.completions.create(model="llama-lora", messages=HI, max_tokens=12, **GREEDY)
    assert adapted.model == "llama-lora"
    assert adapted.choices[0].message.content != base.choices[0].message.content
    streamed = suite.client.chat.completions.create(
        model="llama-lora", messages=HI, max_tokens=12, stream=True, **GREEDY
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == adapted.choices[0].message.content


def test_n_seed_and_stop(suite: Suite) -> None:
    two = suite.client.completions.create(
        model="llama", prompt="pick", n=2, max_tokens=8, temperature=1.0, seed=11
    )
    assert sorted(choice.index for choice in two.choices) == [0, 1]
    again = suite.client.completions.create(
        model="llama", prompt="pick", n=2, max_tokens=8, temperature=1.0, seed=11
    )
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == [
        c.text for c in sorted(two.choices, key=lambda c: c.index)
    ]
    streamed = suite.client.chat.completions.create(
        model="llama", messages=HI, n=2, max_tokens=6, temperature=1.0, seed=3, stream=True
    )
    indexes = {choice.index for chunk in streamed for choice in chunk.choices}
    assert indexes == {0, 1}

    text = suite.client.completions.create(model="llama", prompt="stop", max_tokens=16, **GREEDY)
    full = text.choices[0].text
    stop = full[6:9]
    assert stop.strip(), full
    stopped = suite.client.completions.create(
        model="llama", prompt="stop", max_tokens=16, stop=[stop], **GREEDY
    )
    assert stopped.choices[0].text == full[: full.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_response_format_json_schema(suite: Suite) -> None:
    # A random-weights model under a JSON grammar fills objects with whitespace until
    # max_tokens; a top-level enum leaves it no room for that.
    schema: dict[str, object] = {"type": "string", "enum": ["yes", "no"]}
    answer: ResponseFormatJSONSchema = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema},
    }
    reply = suite.client.chat.completions.create(
        model="llama", messages=HI, max_tokens=40, temperature=0.0, response_format=answer
    )
    content = reply.choices[0].message.content
    assert content is not None
    assert json.loads(content) in ("yes", "no")
    assert reply.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as caught:
        suite.client.chat.completions.create(
            model="llama", messages=HI, response_format={"type": "json_schema", "json_schema": {"name": "x"}}
        )
    assert caught.value.param == "response_format.json_schema"


def test_bad_sampling_parameter_is_400(suite: Suite) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        suite.client.chat.completions.create(model="llama", messages=HI, temperature=-1.0)
    assert caught.value.status_code == 400
    assert "temperature" in caught.value.message


def test_a_second_concurrent_stream_is_429_and_a_cancel_frees_the_slot(suite: Suite) -> None:
    cancelled_before = suite.handled("StreamChat", "CANCELLED")
    first = suite.client.chat.completions.create(
        model="llama", messages=HI, max_tokens=200, stream=True, **GREEDY
    )
    chunks = iter(first)
    next(chunks)  # generation is under way and holds the worker's only slot
    assert suite.running() == 1
    with pytest.raises(openai.RateLimitError) as caught:
        suite.client.chat.completions.create(model="llama", messages=HI, max_tokens=4, stream=True)
    assert caught.value.status_code == 429
    first.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while suite.running() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert suite.running() == 0
    assert suite.handled("StreamChat", "CANCELLED") == cancelled_before + 1
    reply = suite.client.chat.completions.create(model="llama", messages=HI, max_tokens=4)
    assert reply.choices[0].message.content is not None


def test_embeddings_with_only_a_vllm_worker_are_503_no_compatible_worker(suite: Suite) -> None:
    # Routing knows that this vLLM-only worker cannot embed: it is never asked.
    with pytest.raises(openai.InternalServerError) as caught:
        suite.client.embeddings.create(model="llama", input="hello")
    assert caught.value.status_code == 503 and caught.value.code == "no_compatible_worker"
    assert "computes embeddings" in caught.value.message and "transformers" in caught.value.message
