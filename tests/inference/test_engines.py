"""The inference engines on a real tiny Llama: vLLM (CPU) and transformers behind one interface."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import re
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from inference_service.chat import ChatMessage
from inference_service.engines import (
    Engine,
    EngineDelta,
    EngineRequest,
    FinishReason,
    SamplingSpec,
    StructuredOutputSpec,
    Tokenizer,
    collect,
)
from inference_service.engines.vllm_engine import VllmEngine
from inference_service.sampling import GenerationDefaults, resolve_defaults, validate_sampling
from server_kit.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
)
from tests.inference.conftest import TEST_KV_CACHE_BYTES, TINY_ADAPTER_ID
from tinymodels.tokenizer import IM_START_ID

pytestmark = pytest.mark.slow

GREEDY = SamplingSpec(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = ["the cat runs", "a dog sees the red house and", "my friend reads a good book"]

_ids = iter(range(1_000_000))


def rid(prefix: str = "r") -> str:
    """A request id unique in the session."""
    return f"{prefix}-{next(_ids)}"


@pytest.fixture(params=["vllm", "transformers"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """Each engine in turn (the session's instances)."""
    return request.getfixturevalue(f"{request.param}_engine")


async def greedy(engine: Engine, prompt: str, adapter: str | None = None, **spec: Any) -> list[int]:
    """Token ids of a greedy completion of ``prompt``."""
    sampling = dataclasses.replace(GREEDY, **spec)
    request = EngineRequest(rid("greedy"), prompt=prompt, sampling=sampling, adapter_id=adapter)
    result = await collect(engine.generate(request))
    return result.completions[0].token_ids


# -- equality between the engines --------------------------------------------------------------


async def test_vllm_greedy_equals_transformers_greedy(vllm_engine, transformers_engine) -> None:
    for prompt in PROMPTS:
        request = EngineRequest(
            rid(),
            prompt=prompt,
            sampling=SamplingSpec(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2),
        )
        from_vllm = await collect(vllm_engine.generate(request))
        from_hf = await collect(transformers_engine.generate(request))
        a, b = from_vllm.completions[0], from_hf.completions[0]
        assert len(a.token_ids) == 16
        assert a.token_ids == b.token_ids
        assert a.text == b.text
        assert a.finish_reason == b.finish_reason == FinishReason.LENGTH
        assert from_vllm.usage == from_hf.usage
        assert from_vllm.usage.completion_tokens == 16
        assert [lp.token_id for lp in a.logprobs] == a.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t.token_id for t in x.top] == [t.token_id for t in y.top]
            assert len(x.top) == 2


async def test_engines_agree_on_stop_strings_and_stop_token_ids(vllm_engine, transformers_engine) -> None:
    prompt = PROMPTS[1]
    base = await collect(vllm_engine.generate(EngineRequest(rid(), prompt=prompt, sampling=GREEDY)))
    text, tokens = base.completions[0].text, base.completions[0].token_ids
    word = re.search(r"[a-z]{2,}", text[3:])  # a piece of what greedy decoding writes
    assert word is not None, text
    stop = word.group(0)[:2]
    stop_token = tokens[6]
    for sampling in (
        SamplingSpec(temperature=0.0, max_tokens=16, stop=(stop,)),
        SamplingSpec(temperature=0.0, max_tokens=16, stop_token_ids=(stop_token,)),
    ):
        request = EngineRequest(rid(), prompt=prompt, sampling=sampling)
        a = (await collect(vllm_engine.generate(request))).completions[0]
        b = (await collect(transformers_engine.generate(request))).completions[0]
        assert a.finish_reason == b.finish_reason == FinishReason.STOP
        assert (a.text, a.token_ids) == (b.text, b.token_ids)
        if sampling.stop:
            assert a.text == text[: text.index(stop)]  # cut before the stop string
        else:
            assert a.token_ids == tokens[: tokens.index(stop_token) + 1]  # the stop token is kept


async def test_text_prompt_equals_its_token_ids(engine: Engine) -> None:
    ids = engine.tokenizer.encode(PROMPTS[0])
    by_text = await collect(engine.generate(EngineRequest(rid(), prompt=PROMPTS[0], sampling=GREEDY)))
    by_ids = await collect(engine.generate(EngineRequest(rid(), prompt_token_ids=ids, sampling=GREEDY)))
    assert by_text.completions[0].token_ids == by_ids.completions[0].token_ids
    assert by_text.usage.prompt_tokens == len(ids)


# -- streaming and cancellation -----------------------------------------------------------------


async def test_streaming_delivers_every_token_in_order(engine: Engine) -> None:
    sampling = SamplingSpec(temperature=0.0, max_tokens=24, ignore_eos=True)
    deltas: list[EngineDelta] = [
        d async for d in engine.generate(EngineRequest(rid(), prompt=PROMPTS[2], sampling=sampling))
    ]
    unary = await collect(engine.generate(EngineRequest(rid(), prompt=PROMPTS[2], sampling=sampling)))
    streamed_tokens = [t for d in deltas for t in d.token_ids]
    assert streamed_tokens == unary.completions[0].token_ids
    assert len(streamed_tokens) == 24
    assert "".join(d.text for d in deltas) == unary.completions[0].text
    assert len([d for d in deltas if d.token_ids]) >= 12  # streamed as produced, not in one burst
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == FinishReason.LENGTH
    assert [d.usage for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].usage == unary.usage


async def test_cancelled_stream_leaves_no_unfinished_request(engine: Engine) -> None:
    first = asyncio.Event()
    received: list[int] = []

    async def consume() -> None:
        sampling = SamplingSpec(temperature=0.0, max_tokens=200, ignore_eos=True)
        async for delta in engine.generate(
            EngineRequest(rid("cancel"), prompt=PROMPTS[0], sampling=sampling)
        ):
            received.extend(delta.token_ids)
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), timeout=30)
    assert engine.num_unfinished_requests() == 1
    task.cancel()  # lands in the engine's await: the engine aborts the request before re-raising
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.num_unfinished_requests() == 0
    assert len(received) < 200


async def test_cancelled_slow_consumer_aborts_through_aclosing(engine: Engine) -> None:
    """A consumer cancelled while busy elsewhere (e.g. writing to a slow client) closes the stream."""
    first = asyncio.Event()

    async def consume() -> None:
        sampling = SamplingSpec(temperature=0.0, max_tokens=200, ignore_eos=True)
        request = EngineRequest(rid("slow"), prompt=PROMPTS[1], sampling=sampling)
        async with contextlib.aclosing(engine.generate(request)) as stream:
            async for _ in stream:
                first.set()
                await asyncio.Event().wait()  # never set: the consumer is stuck here when cancelled

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), timeout=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.num_unfinished_requests() == 0


async def test_abort_ends_the_stream_with_abort(engine: Engine) -> None:
    request_id = rid("abort")
    sampling = SamplingSpec(temperature=0.0, max_tokens=200, ignore_eos=True)
    deltas = []
    async for delta in engine.generate(EngineRequest(request_id, prompt=PROMPTS[0], sampling=sampling)):
        deltas.append(delta)
        if len(deltas) == 1:
            await engine.abort(request_id)
    assert deltas[-1].finish_reason == FinishReason.ABORT
    assert deltas[-1].usage is not None
    assert deltas[-1].usage.completion_tokens == sum(len(d.token_ids) for d in deltas) < 200
    assert engine.num_unfinished_requests() == 0


async def test_sixteen_concurrent_streams_all_complete(vllm_engine: VllmEngine) -> None:
    prompts = [f"{PROMPTS[i % 3]} {i}" for i in range(16)]
    solo = [await greedy(vllm_engine, p, max_tokens=8) for p in prompts]

    async def stream(prompt: str) -> tuple[list[int], FinishReason | None]:
        sampling = SamplingSpec(temperature=0.0, max_tokens=8, ignore_eos=True)
        tokens: list[int] = []
        reason = None
        async for delta in vllm_engine.generate(EngineRequest(rid("c16"), prompt=prompt, sampling=sampling)):
            tokens.extend(delta.token_ids)
            reason = delta.finish_reason or reason
        return tokens, reason

    results = await asyncio.wait_for(asyncio.gather(*(stream(p) for p in prompts)), timeout=60)
    assert [r[1] for r in results] == [FinishReason.LENGTH] * 16
    assert [r[0] for r in results] == solo  # batching does not change greedy output
    assert vllm_engine.num_unfinished_requests() == 0


# -- LoRA ---------------------------------------------------------------------------------------


async def test_lora_adapter_changes_output_and_mixes_with_base(vllm_engine, transformers_engine) -> None:
    prompt = PROMPTS[0]
    base = await greedy(vllm_engine, prompt)
    tuned = await greedy(vllm_engine, prompt, adapter=TINY_ADAPTER_ID)
    assert tuned != base
    assert tuned == await greedy(transformers_engine, prompt, adapter=TINY_ADAPTER_ID)  # vLLM LoRA == peft
    assert base == await greedy(transformers_engine, prompt)  # the adapter is off for base requests

    adapters = [None, TINY_ADAPTER_ID] * 3
    mixed = await asyncio.gather(*(greedy(vllm_engine, prompt, adapter=a) for a in adapters))
    assert mixed == [base if a is None else tuned for a in adapters]


async def test_adapters_hot_load_and_unload(engine: Engine, tiny_lora: Path) -> None:
    with pytest.raises(NotFound) as missing:
        await greedy(engine, PROMPTS[0], adapter="models/not-loaded")
    assert missing.value.reason == "ADAPTER_NOT_LOADED"

    await engine.add_adapter("models/second", tiny_lora)
    await engine.add_adapter("models/second", tiny_lora)  # same path again: a no-op
    assert engine.adapters() == [TINY_ADAPTER_ID, "models/second"]
    assert await greedy(engine, PROMPTS[0], adapter="models/second") == await greedy(
        engine, PROMPTS[0], adapter=TINY_ADAPTER_ID
    )
    with pytest.raises(AlreadyExists):
        await engine.add_adapter("models/second", tiny_lora.parent)

    # Removing an adapter aborts the requests running on it.
    long = SamplingSpec(temperature=0.0, max_tokens=200, ignore_eos=True)
    stream = engine.generate(
        EngineRequest(rid(), prompt=PROMPTS[0], sampling=long, adapter_id="models/second")
    )
    first = await anext(stream)
    await engine.remove_adapter("models/second")
    rest = [delta async for delta in stream]
    assert rest[-1].finish_reason == FinishReason.ABORT
    assert len(first.token_ids) + sum(len(d.token_ids) for d in rest) < 200
    assert engine.adapters() == [TINY_ADAPTER_ID]
    with pytest.raises(NotFound):
        await greedy(engine, PROMPTS[0], adapter="models/second")
    with pytest.raises(NotFound):
        await engine.remove_adapter("models/second")


async def test_vllm_refuses_an_adapter_above_its_max_rank(vllm_engine: VllmEngine, tiny_lora: Path) -> None:
    with pytest.raises(FailedPrecondition) as error:
        await vllm_engine.add_adapter("models/too-big", tiny_lora, rank=32)
    assert error.value.reason == "ADAPTER_RANK_TOO_LARGE"
    assert error.value.metadata == {"rank": "32", "max_lora_rank": "8"}
    assert "models/too-big" not in vllm_engine.adapters()


# -- sampling -----------------------------------------------------------------------------------


async def test_seeded_sampling_is_reproducible_and_n_gives_n_completions(engine: Engine) -> None:
    sampling = SamplingSpec(temperature=1.0, top_p=0.9, top_k=50, seed=7, n=3, max_tokens=8, ignore_eos=True)
    first = await collect(engine.generate(EngineRequest(rid(), prompt=PROMPTS[0], sampling=sampling)))
    again = await collect(engine.generate(EngineRequest(rid(), prompt=PROMPTS[0], sampling=sampling)))
    assert [c.index for c in first.completions] == [0, 1, 2]
    assert [c.token_ids for c in first.completions] == [c.token_ids for c in again.completions]
    assert len({tuple(c.token_ids) for c in first.completions}) > 1
    assert first.usage.completion_tokens == 24


def test_validation_reports_one_violation_per_bad_field() -> None:
    bad = SamplingSpec(
        temperature=-0.1,
        top_p=0.0,
        top_k=0,
        min_p=1.5,
        max_tokens=0,
        presence_penalty=2.5,
        frequency_penalty=-3.0,
        repetition_penalty=0.0,
        n=17,
        logprobs=21,
        seed=-1,
        stop=("ok", ""),
        stop_token_ids=(5, 9999),
    )
    with pytest.raises(InvalidArgument) as error:
        validate_sampling(bad, max_model_len=256, prompt_tokens=4, vocab_size=512)
    assert error.value.reason == "INVALID_SAMPLING_PARAMS"
    assert sorted(v.field for v in error.value.violations) == sorted(
        f"sampling.{name}"
        for name in (
            "temperature", "top_p", "top_k", "min_p", "max_tokens", "presence_penalty",
            "frequency_penalty", "repetition_penalty", "n", "logprobs", "seed", "stop[1]",
            "stop_token_ids[1]",
        )
    )  # fmt: skip

    edges = SamplingSpec(
        temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0, max_tokens=1, presence_penalty=-2.0,
        frequency_penalty=2.0, repetition_penalty=0.5, n=16, logprobs=20, seed=0,
    )  # fmt: skip
    validate_sampling(edges, max_model_len=256, prompt_tokens=4)  # the limits themselves are valid

    with pytest.raises(InvalidArgument) as prefixed:
        validate_sampling(SamplingSpec(top_p=2.0), max_model_len=256, prompt_tokens=4, field_prefix="params")
    assert [v.field for v in prefixed.value.violations] == ["params.top_p"]


async def test_engine_rejects_bad_sampling_before_generating(engine: Engine) -> None:
    with pytest.raises(InvalidArgument) as error:
        await collect(engine.generate(EngineRequest(rid(), prompt="x", sampling=SamplingSpec(top_k=0, n=0))))
    assert [v.field for v in error.value.violations] == ["sampling.top_k", "sampling.n"]
    with pytest.raises(InvalidArgument) as bad_ids:
        await collect(engine.generate(EngineRequest(rid(), prompt_token_ids=[1, 10_000])))
    assert bad_ids.value.reason == "INVALID_PROMPT"
    assert engine.num_unfinished_requests() == 0


async def test_prompt_longer_than_the_context_is_refused_with_the_numbers(engine: Engine) -> None:
    assert engine.max_model_len == 256
    with pytest.raises(InvalidArgument) as error:
        await collect(engine.generate(EngineRequest(rid(), prompt_token_ids=[7] * 256)))
    assert error.value.reason == "PROMPT_TOO_LONG"
    assert error.value.metadata == {"prompt_tokens": "256", "max_model_len": "256"}
    assert "256 tokens" in error.value.message

    # One token of room: generation stops at the context length.
    result = await collect(engine.generate(EngineRequest(rid(), prompt_token_ids=[7] * 255, sampling=GREEDY)))
    assert result.completions[0].finish_reason == FinishReason.LENGTH
    assert result.usage.completion_tokens == 1


async def test_duplicate_running_request_id_is_refused(engine: Engine) -> None:
    sampling = SamplingSpec(temperature=0.0, max_tokens=100, ignore_eos=True)
    first = engine.generate(EngineRequest("same-id", prompt=PROMPTS[0], sampling=sampling))
    await anext(first)
    with pytest.raises(AlreadyExists):
        await collect(engine.generate(EngineRequest("same-id", prompt=PROMPTS[1], sampling=sampling)))
    await first.aclose()  # stopping early aborts
    assert engine.num_unfinished_requests() == 0


def test_model_defaults_fill_only_unset_fields(tiny_llm: Path) -> None:
    defaults = GenerationDefaults.from_model_dir(tiny_llm)
    assert (defaults.temperature, defaults.top_p) == (0.7, 0.9)
    resolved = defaults.apply(SamplingSpec(top_p=0.5))
    assert (resolved.temperature, resolved.top_p, resolved.max_tokens) == (0.7, 0.5, 16)
    assert resolve_defaults(SamplingSpec(temperature=0.0), default_temperature=0.7).temperature == 0.0
    assert GenerationDefaults.from_model_dir(tiny_llm / "missing") == GenerationDefaults()


# -- structured output --------------------------------------------------------------------------


async def test_vllm_structured_output_follows_choice_and_regex(vllm_engine: VllmEngine) -> None:
    choices = ("yes", "no", "maybe")
    for constraint, check in (
        (StructuredOutputSpec(choice=choices), lambda text: text in choices),
        (
            StructuredOutputSpec(regex=r"[a-z]{3} [0-9]{2}"),
            lambda text: re.fullmatch(r"[a-z]{3} [0-9]{2}", text),
        ),
    ):
        request = EngineRequest(
            rid(),
            prompt=PROMPTS[0],
            sampling=SamplingSpec(temperature=0.0, max_tokens=20),
            structured_output=constraint,
        )
        result = await collect(vllm_engine.generate(request))
        assert check(result.completions[0].text), result.completions[0].text
        assert result.completions[0].finish_reason == FinishReason.STOP

    with pytest.raises(InvalidArgument) as error:
        bad = StructuredOutputSpec(json_schema="{not json")
        await collect(vllm_engine.generate(EngineRequest(rid(), prompt="x", structured_output=bad)))
    assert error.value.reason == "INVALID_STRUCTURED_OUTPUT"


async def test_transformers_refuses_structured_output(transformers_engine) -> None:
    request = EngineRequest(rid(), prompt="x", structured_output=StructuredOutputSpec(choice=("a", "b")))
    with pytest.raises(Unimplemented) as error:
        await collect(transformers_engine.generate(request))
    assert error.value.reason == "STRUCTURED_OUTPUT_UNSUPPORTED"
    assert not transformers_engine.supports_structured_output


# -- chat ---------------------------------------------------------------------------------------


async def test_chat_renders_with_the_model_template(engine: Engine) -> None:
    tokenizer = engine.tokenizer
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(messages)
    assert (
        rendered
        == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template([ChatMessage("user", "hi")], add_generation_prompt=False).endswith(
        "hi<|im_end|>\n"
    )
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert ids[0] == IM_START_ID and ids.count(IM_START_ID) == 3  # the template's special tokens
    result = await collect(
        engine.generate(EngineRequest(rid(), prompt=rendered, add_special_tokens=False, sampling=GREEDY))
    )
    assert result.usage.prompt_tokens == len(ids)

    override = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}>"
    assert tokenizer.apply_chat_template(messages, template=override) == "[system] be brief\n[user] hi\n>"


def test_chat_errors_say_what_to_do(tiny_llm: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(tiny_llm)
    hf = copy.deepcopy(tokenizer.hf_tokenizer)
    hf.chat_template = None
    with pytest.raises(FailedPrecondition) as missing:
        Tokenizer(hf).apply_chat_template([{"role": "user", "content": "hi"}])
    assert missing.value.reason == "NO_CHAT_TEMPLATE"
    assert "chat_template" in missing.value.message
    assert Tokenizer(hf).apply_chat_template(
        [{"role": "user", "content": "hi"}], template="{{ messages[0].content }}"
    )

    with pytest.raises(InvalidArgument) as roles:
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}])
    assert [v.field for v in roles.value.violations] == ["messages[1].role"]
    with pytest.raises(InvalidArgument) as empty:
        tokenizer.apply_chat_template([])
    assert empty.value.reason == "EMPTY_CONVERSATION"
    with pytest.raises(InvalidArgument) as syntax:
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}], template="{% for %}")
    assert syntax.value.reason == "INVALID_CHAT_TEMPLATE"
    refusing = "{{ raise_exception('roles must alternate user/assistant') }}"
    with pytest.raises(InvalidArgument) as refused:
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}], template=refusing)
    assert refused.value.reason == "CHAT_TEMPLATE_ERROR"
    assert "roles must alternate" in refused.value.message


# -- lifecycle ----------------------------------------------------------------------------------


def _engine_core_processes() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()]


async def test_vllm_close_stops_the_engine_process(tiny_llm: Path) -> None:
    before = {p.pid for p in _engine_core_processes()}
    engine = VllmEngine(
        tiny_llm,
        dtype="float32",
        kv_cache_memory_bytes=TEST_KV_CACHE_BYTES,
        enable_lora=False,
        enforce_eager=True,
    )
    started = time.monotonic()
    await engine.start()
    print(f"vLLM engine start: {time.monotonic() - started:.1f}s")
    ours = [p for p in _engine_core_processes() if p.pid not in before]
    assert len(ours) == 1
    assert await greedy(engine, PROMPTS[0], max_tokens=4)
    with pytest.raises(FailedPrecondition) as no_lora:
        await engine.add_adapter("models/x", tiny_llm)
    assert no_lora.value.reason == "LORA_DISABLED"

    # Closing aborts what is running, then stops the EngineCore process.
    long = SamplingSpec(temperature=0.0, max_tokens=200, ignore_eos=True)
    stream = engine.generate(EngineRequest(rid(), prompt=PROMPTS[0], sampling=long))
    await anext(stream)
    await engine.close()
    assert [delta async for delta in stream][-1].finish_reason == FinishReason.ABORT
    assert not ours[0].is_running() or ours[0].status() == psutil.STATUS_ZOMBIE
    with pytest.raises(Unavailable) as closed:
        await greedy(engine, PROMPTS[0])
    assert closed.value.reason == "ENGINE_CLOSED"
    await engine.close()  # idempotent


async def test_transformers_close_frees_the_model(tiny_llm: Path) -> None:
    from inference_service.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(tiny_llm, dtype="float32", device="cpu")
    await engine.start()
    assert engine.dtype == "float32"
    assert await greedy(engine, PROMPTS[0], max_tokens=4)
    long = SamplingSpec(temperature=0.0, max_tokens=200, ignore_eos=True)
    stream = engine.generate(EngineRequest(rid(), prompt=PROMPTS[0], sampling=long))
    await anext(stream)
    await engine.close()
    assert [delta async for delta in stream][-1].finish_reason == FinishReason.ABORT
    with pytest.raises(Unavailable):
        await greedy(engine, PROMPTS[0])
