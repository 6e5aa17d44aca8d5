"""InferenceClient and AsyncInferenceClient against a fake worker on a real gRPC server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from clients.errors import ModelyardRpcError
from clients.inference import AsyncInferenceClient, InferenceClient
from modelyard.inference.v1 import inference_service_pb2 as ipb
from tests.clients.conftest import Served
from tests.clients.doubles import FakeInferenceWorker, ServerThread


def test_generate_sends_the_request_the_keywords_describe(start_worker: Callable[..., Served]) -> None:
    served = start_worker("one two three")
    with InferenceClient(served.address) as client:
        reply = client.generate(
            "tiny", "Hello", adapter="tiny-ft", max_tokens=4, temperature=0, seed=7, request_id="r-1"
        )
    assert reply.completions[0].text == "one two three"
    assert reply.request_id == "r-1"
    assert reply.model == "models/tiny"
    sent = served.servicer.requests[-1]
    assert isinstance(sent, ipb.GenerateRequest)
    assert (sent.model, sent.adapter, sent.prompt) == ("models/tiny", "models/tiny-ft", "Hello")
    assert sent.sampling.HasField("temperature") and sent.sampling.temperature == 0
    assert (sent.sampling.max_tokens, sent.sampling.seed) == (4, 7)


def test_prompt_token_ids(start_worker: Callable[..., Served]) -> None:
    served = start_worker()
    with InferenceClient(served.address) as client:
        client.generate("tiny", [1, 2, 3])
    sent = served.servicer.requests[-1]
    assert sent.WhichOneof("input") == "prompt_token_ids"
    assert list(sent.prompt_token_ids.ids) == [1, 2, 3]


def test_stream_generate_yields_every_delta_in_order(start_worker: Callable[..., Served]) -> None:
    served = start_worker("a b c d")
    with InferenceClient(served.address) as client:
        deltas = list(client.stream_generate("tiny", "x", max_tokens=4))
    assert "".join(d.text for d in deltas) == "a b c d"
    assert deltas[-1].finish_reason == ipb.FINISH_REASON_LENGTH
    assert deltas[-1].usage.completion_tokens == 4


def test_leaving_a_stream_early_cancels_it_on_the_server(
    start_worker: Callable[..., Served], server_thread: ServerThread
) -> None:
    served = start_worker("a b c")
    worker = served.servicer
    assert isinstance(worker, FakeInferenceWorker)
    worker.hold_streams = True
    with InferenceClient(served.address) as client:
        for delta in client.stream_generate("tiny", "x"):
            assert delta.text == "a"
            break
    # The server-side generator sees the cancellation (the engine request would be aborted).
    server_thread.run(asyncio.wait_for(worker.stream_cancelled.wait(), 10))


def test_chat_accepts_dicts_and_streams(start_worker: Callable[..., Served]) -> None:
    served = start_worker()
    messages = [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}]
    with InferenceClient(served.address) as client:
        reply = client.chat("tiny", messages, max_tokens=8, chat_template="{{ messages }}")
        streamed = "".join(d.content for d in client.stream_chat("tiny", messages))
    assert reply.choices[0].message.content == "[terse] echo 1: hi"
    assert streamed == "[terse] echo 1: hi"
    sent = served.servicer.requests[-2]
    assert isinstance(sent, ipb.ChatRequest)
    assert [m.role for m in sent.messages] == ["system", "user"]
    assert sent.chat_template == "{{ messages }}"


def test_model_management(start_worker: Callable[..., Served]) -> None:
    served = start_worker()
    with InferenceClient(served.address) as client:
        loaded = client.load_model("tiny", max_model_len=512)
        assert (loaded.model, loaded.max_model_len) == ("models/tiny", 512)
        assert [m.model for m in client.list_loaded_models()] == ["models/tiny"]
        assert client.get_server_info().loaded_models[0].model == "models/tiny"
        client.unload_model("tiny")
        assert client.list_loaded_models() == []


def test_errors_are_typed_with_reason_metadata_and_violations(start_worker: Callable[..., Served]) -> None:
    served = start_worker()
    with InferenceClient(served.address) as client:
        with pytest.raises(ModelyardRpcError) as missing:
            client.generate("missing", "x")
        with pytest.raises(ModelyardRpcError) as invalid:
            client.generate("", "x")
        with pytest.raises(ModelyardRpcError) as not_loaded:
            client.unload_model("never-loaded")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert missing.value.reason == "MODEL_NOT_FOUND"
    assert missing.value.metadata["model"] == "models/missing"
    assert missing.value.request_id  # the id the server logged the failure under
    assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid.value.field_violations == [("model", "required")]
    assert "model: required" in str(invalid.value)
    assert not_loaded.value.reason == "MODEL_NOT_LOADED"


def test_unreachable_server_is_unavailable() -> None:
    from tests.helpers import free_port

    with (
        InferenceClient(f"127.0.0.1:{free_port()}", timeout=5) as client,
        pytest.raises(ModelyardRpcError) as error,
    ):
        client.get_server_info()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


async def test_async_client_generates_streams_chats_and_decodes_errors(
    start_worker: Callable[..., Served],
) -> None:
    served = start_worker("x y z")
    async with AsyncInferenceClient(served.address) as client:
        reply = await client.generate("tiny", "hi", max_tokens=3)
        assert reply.completions[0].text == "x y z"
        deltas = [d.text async for d in client.stream_generate("tiny", "hi")]
        assert "".join(deltas) == "x y z"
        chat = await client.chat("tiny", [("user", "hello")])
        assert chat.choices[0].message.content == "echo 1: hello"
        with pytest.raises(ModelyardRpcError) as error:
            await client.generate("missing", "x")
        assert (error.value.code, error.value.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")


async def test_async_stream_left_early_is_cancelled(
    start_worker: Callable[..., Served], server_thread: ServerThread
) -> None:
    served = start_worker("a b c")
    worker = served.servicer
    assert isinstance(worker, FakeInferenceWorker)
    worker.hold_streams = True
    async with AsyncInferenceClient(served.address) as client:
        stream = client.stream_generate("tiny", "x")
        async for delta in stream:
            assert delta.text == "a"
            break
        await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.wrap_future(
        asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(worker.stream_cancelled.wait(), 10), server_thread.loop
        )
    )
