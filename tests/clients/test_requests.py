"""Request building: keyword arguments become exactly the proto fields a user meant."""

from __future__ import annotations

import pytest

from clients.inference import chat_message, sampling_params, structured_output
from clients.routing import RouteTable
from clients.trainer import dataset_format, hyperparameters, job_name, training_method
from modelyard.inference.v1 import inference_service_pb2 as ipb
from modelyard.trainer.v1 import trainer_service_pb2 as tpb


def test_sampling_keywords_set_optional_fields_with_presence() -> None:
    params = sampling_params(temperature=0.0, max_tokens=8, stop=["\n"], seed=None)
    # temperature 0 (greedy) must be *present*, not confused with "unset".
    assert params.HasField("temperature") and params.temperature == 0.0
    assert params.max_tokens == 8
    assert list(params.stop) == ["\n"]
    assert not params.HasField("seed")
    assert not params.HasField("top_p")


def test_sampling_keywords_override_a_given_message() -> None:
    base = ipb.SamplingParams(temperature=0.7, top_p=0.9)
    params = sampling_params(base, temperature=0.1)
    assert params.temperature == pytest.approx(0.1)
    assert params.top_p == pytest.approx(0.9)
    assert base.temperature == pytest.approx(0.7)  # the caller's message is not changed


def test_unknown_sampling_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unknown sampling parameter 'temprature'"):
        sampling_params(temprature=0.5)


def test_structured_output_takes_one_constraint() -> None:
    out = structured_output(json_schema={"type": "object"})
    assert out is not None and out.json_schema == '{"type": "object"}'
    choice = structured_output(choices=["yes", "no"])
    assert choice is not None and list(choice.choice.choices) == ["yes", "no"]
    assert structured_output() is None
    with pytest.raises(ValueError, match="at most one"):
        structured_output(regex="a+", choices=["a"])


def test_chat_messages_from_dicts_pairs_and_protos() -> None:
    assert chat_message({"role": "user", "content": "hi"}) == ipb.ChatMessage(role="user", content="hi")
    assert chat_message(("system", "be brief")) == ipb.ChatMessage(role="system", content="be brief")
    with pytest.raises(ValueError, match="name"):
        chat_message({"role": "user", "content": "x", "name": "bob"})


def test_hyperparameters_and_lora_keywords() -> None:
    params = hyperparameters(
        epochs=2, learning_rate=1e-4, batch_size=None, lora_r=16, lora_target_modules=["q_proj"]
    )
    assert params.epochs == 2 and params.learning_rate == pytest.approx(1e-4)
    assert not params.HasField("batch_size")
    assert params.lora.r == 16 and list(params.lora.target_modules) == ["q_proj"]
    with pytest.raises(TypeError, match="unknown hyperparameter 'lora_rank'"):
        hyperparameters(lora_rank=8)


def test_methods_formats_and_names() -> None:
    assert training_method("lora") == tpb.TRAINING_METHOD_LORA
    assert training_method("DPO") == tpb.TRAINING_METHOD_DPO
    assert training_method(tpb.TRAINING_METHOD_FULL) == tpb.TRAINING_METHOD_FULL
    with pytest.raises(ValueError, match="known: lora, qlora, full, dpo"):
        training_method("sft")
    assert dataset_format("prompt-completion") == tpb.DATASET_FORMAT_PROMPT_COMPLETION
    assert job_name("j1") == "trainingJobs/j1" == job_name("trainingJobs/j1")


def test_route_table_expires_and_forgets() -> None:
    routes = RouteTable(refresh_seconds=10)
    routes.put("models/m", ["a:1", "b:2"], now=100.0)
    assert routes.get("models/m", now=105.0) == ["a:1", "b:2"]
    routes.forget("models/m", "a:1")
    assert routes.get("models/m", now=105.0) == ["b:2"]
    assert routes.get("models/m", now=111.0) is None  # stale: ask the catalog again
    routes.forget("models/m", "b:2")
    assert routes.get("models/m", now=105.0) is None  # every worker failed: ask again
