"""Random sampling values, prompts, chat messages and templates to a real inference server.

One catalog and one inference server (transformers engine, the tiny Llama
loaded) serve the module. Every answer must be a reply or a proper status:
never INTERNAL or UNKNOWN, and the server keeps generating afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from clients.catalog import CatalogClient
from inference_service.app import InferenceApp
from inference_service.settings import InferenceSettings
from modelyard.inference.v1 import inference_service_pb2 as pb
from modelyard.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.fuzz.conftest import FUZZ, proper_status
from tests.servers import ThreadedServer
from tinymodels.llm import build_llm

INT32 = st.integers(-(2**31), 2**31 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1e-300, 1e300, -1.0])
SMALL = st.integers(-3, 4)


class Inference:
    """Catalog + transformers inference server with `models/llama` loaded."""

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
                    worker_id="inference-fuzz",
                )
            )
        )
        self.channel = grpc.insecure_channel(self.server.target)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.stub.LoadModel(pb.LoadModelRequest(model="models/llama"), timeout=300)

    def healthy(self) -> None:
        """A plain greedy request still completes."""
        sampling = pb.SamplingParams(temperature=0.0, max_tokens=2)
        reply = self.stub.Generate(
            pb.GenerateRequest(model="models/llama", prompt="hi", sampling=sampling), timeout=60
        )
        assert reply.completions

    def close(self) -> None:
        self.channel.close()
        self.server.stop()
        self.catalog_server.stop()


@pytest.fixture(scope="module")
def inference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inference]:
    running = Inference(tmp_path_factory.mktemp("fuzz-inference"))
    try:
        yield running
        running.healthy()
    finally:
        running.close()


@st.composite
def sampling(draw: st.DrawFn) -> pb.SamplingParams:
    """SamplingParams with each field unset, extreme or plausible; max_tokens stays small when valid."""
    params = pb.SamplingParams()
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    ):
        if draw(st.booleans()):
            setattr(params, name, draw(FLOATS))
    for name in ("top_k", "n", "logprobs"):
        if draw(st.booleans()):
            setattr(params, name, draw(INT32 | SMALL))
    # Long generations cost seconds each: keep valid lengths short, invalid ones extreme.
    params.max_tokens = draw(st.integers(-(2**31), 0) | st.integers(1, 3) | st.just(2**31 - 1))
    if draw(st.booleans()):
        params.seed = draw(st.integers(-(2**63), 2**63 - 1))
    params.stop.extend(draw(st.lists(st.text(max_size=5), max_size=3)))
    params.stop_token_ids.extend(draw(st.lists(INT32, max_size=3)))
    if draw(st.booleans()):
        params.ignore_eos = draw(st.booleans())
    return params


PROMPTS = st.one_of(
    st.text(max_size=40), st.just(""), st.just("word " * 3000), st.just("\x00\ud7ff\U0010ffff")
)


@FUZZ
@given(params=sampling(), prompt=PROMPTS, adapter=st.sampled_from(["", "models/nope", "x"]))
def test_generate_with_random_sampling_and_prompts(
    inference: Inference, params: pb.SamplingParams, prompt: str, adapter: str
) -> None:
    request = pb.GenerateRequest(model="models/llama", adapter=adapter, prompt=prompt, sampling=params)
    proper_status(lambda: inference.stub.Generate(request, timeout=60))


@FUZZ
@given(ids=st.lists(INT32, max_size=6), params=sampling())
def test_generate_with_random_token_ids(
    inference: Inference, ids: list[int], params: pb.SamplingParams
) -> None:
    request = pb.GenerateRequest(model="models/llama", prompt_token_ids=pb.TokenIds(ids=ids), sampling=params)
    proper_status(lambda: inference.stub.Generate(request, timeout=60))


JINJA = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        [
            "{{", "{% for m in messages %}", "{{ messages[0].content }}", "{{ raise_exception('no') }}",
            "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
            "{{ 1/0 }}", "{{ messages.__class__.__mro__ }}", "{{ undefined.attr }}", "{% include 'x' %}",
            "{{ cycler.__init__.__globals__ }}", "{{ x|int + [] }}",
        ]
    ),
)  # fmt: skip
MESSAGES = st.lists(
    st.builds(
        pb.ChatMessage,
        role=st.sampled_from(["user", "assistant", "system", "tool", ""]) | st.text(max_size=8),
        content=st.text(max_size=40),
    ),
    max_size=4,
)


@FUZZ
@given(messages=MESSAGES, template=st.none() | JINJA, params=sampling(), stream=st.booleans())
def test_chat_with_random_messages_and_templates(
    inference: Inference,
    messages: list[pb.ChatMessage],
    template: str | None,
    params: pb.SamplingParams,
    stream: bool,
) -> None:
    if stream:
        streamed = pb.StreamChatRequest(model="models/llama", messages=messages, sampling=params)
        if template is not None:
            streamed.chat_template = template
        proper_status(lambda: list(inference.stub.StreamChat(streamed, timeout=60)))
        return
    request = pb.ChatRequest(model="models/llama", messages=messages, sampling=params)
    if template is not None:
        request.chat_template = template
    proper_status(lambda: inference.stub.Chat(request, timeout=60))
