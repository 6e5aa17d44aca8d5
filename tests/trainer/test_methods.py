"""The alignment methods end to end: ORPO, KTO, reward modelling and GRPO on the tiny Llama.

Each job runs a few optimizer steps in a real worker process against the real
catalog, with the default eval split (10 %, at least one row): what users rely
on is that the job SUCCEEDS, reports the method's own evaluation (preference
accuracy, mean reward), and registers its result with the right lineage — for
reward modelling a sequence-classification model the catalog calls a reward
model, which a GRPO job then uses as its reward.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clients.catalog import AsyncCatalogClient
from modelyard.catalog.v1 import model_pb2
from modelyard.trainer.v1 import trainer_service_pb2 as pb
from server_kit.errors import FailedPrecondition, InvalidArgument
from tests.trainer.conftest import BASE_MODEL, write_jsonl
from tests.trainer.test_manager import follow, request, states
from trainer_service.manager import EVAL, JobManager

pytestmark = pytest.mark.slow


def unpaired_rows(n: int = 10) -> list[dict[str, Any]]:
    """KTO rows: a completion and whether it is desirable."""
    return [
        {"prompt": f"Is {i} even? ", "completion": "yes." if i % 2 == 0 else "no.", "label": i % 2 == 0}
        for i in range(n)
    ]


def prompt_rows(n: int = 8) -> list[dict[str, Any]]:
    """GRPO rows: a prompt and the answer the `answer_match` reward looks for."""
    return [{"prompt": f"What is {i} plus {i}? ", "answer": str(2 * i)} for i in range(n)]


async def test_orpo_kto_reward_and_grpo_jobs_succeed_and_register(
    make_manager: Callable[..., JobManager], data: dict[str, Path], tmp_path: Path,
    catalog_client: AsyncCatalogClient,
) -> None:  # fmt: skip
    manager = make_manager(max_concurrent_jobs=2)
    await manager.start()
    orpo = await manager.create("orpo-job", request(data["preference"], pb.TRAINING_METHOD_ORPO, max_steps=2))
    kto_data = write_jsonl(tmp_path / "kto.jsonl", unpaired_rows())
    kto = await manager.create("kto-job", request(kto_data, pb.TRAINING_METHOD_KTO, max_steps=2))
    assert kto.dataset.format == pb.DATASET_FORMAT_UNPAIRED_PREFERENCE
    assert (kto.train_row_count, kto.eval_row_count) == (9, 1)  # the default eval split, reported
    reward = await manager.create(
        "reward-job", request(data["preference"], pb.TRAINING_METHOD_REWARD, max_steps=3, output="tiny-rm")
    )
    jobs = await asyncio.gather(*(follow(manager, job.name) for job in (orpo, kto, reward)))
    for events in jobs:
        assert states(events)[-1] == "SUCCEEDED", events[-1].job.error
    orpo_events, kto_events, reward_events = jobs
    # The methods' own evaluation streams: preference accuracy for ORPO and the reward model.
    for events in (orpo_events, reward_events):
        evals = [e.job.progress.eval_metrics for e in events if e.type == EVAL]
        assert evals and 0.0 <= evals[-1]["accuracy"] <= 1.0

    orpo_model = await catalog_client.get_model(orpo_events[-1].job.output_model)
    assert orpo_model.llm.HasField("adapter") and orpo_model.parent == BASE_MODEL
    assert orpo_model.labels["training-method"] == "orpo" and "eval-accuracy" in orpo_model.labels
    kto_model = await catalog_client.get_model(kto_events[-1].job.output_model)
    assert kto_model.llm.HasField("adapter") and kto_model.labels["training-method"] == "kto"
    rm = await catalog_client.get_model("tiny-rm")
    assert rm.llm.task == model_pb2.LLM_TASK_REWARD_MODEL and not rm.llm.HasField("adapter")
    assert rm.llm.architecture == "LlamaForSequenceClassification" and rm.parent == BASE_MODEL
    assert "reward-model" in rm.tags

    # A reward model is no base for fine-tuning; GRPO takes it as its reward.
    with pytest.raises(FailedPrecondition) as not_generative:
        await manager.create("", pb.TrainingJob(**{**_fields(request(data["chat"])), "base_model": rm.name}))
    assert not_generative.value.reason == "BASE_MODEL_NOT_GENERATIVE"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows())
    grpo_request = request(prompts, pb.TRAINING_METHOD_GRPO, max_steps=2, batch_size=2)
    grpo_request.hyperparameters.grpo.reward_functions.append("answer_match")
    grpo_request.hyperparameters.grpo.reward_model = rm.name
    grpo_request.hyperparameters.grpo.num_generations = 2
    grpo_request.hyperparameters.grpo.max_completion_length = 8
    grpo = await manager.create("grpo-job", grpo_request)
    assert grpo.dataset.format == pb.DATASET_FORMAT_PROMPT_ONLY
    assert grpo.hyperparameters.grpo.reward_model == "models/tiny-rm"
    grpo_events = await follow(manager, grpo.name)
    assert states(grpo_events)[-1] == "SUCCEEDED", grpo_events[-1].job.error
    assert "reward" in [e for e in grpo_events if e.type == EVAL][-1].job.progress.eval_metrics
    grpo_model = await catalog_client.get_model(grpo_events[-1].job.output_model)
    assert grpo_model.llm.HasField("adapter") and grpo_model.labels["training-method"] == "grpo"

    # Rows are checked for what the method and its rewards read, by row, before any compute.
    no_answer = write_jsonl(tmp_path / "no-answer.jsonl", [{"prompt": "Hi"}, {"prompt": "Yo", "answer": "x"}])
    bad = request(no_answer, pb.TRAINING_METHOD_GRPO, batch_size=2)
    bad.hyperparameters.grpo.reward_functions.append("answer_match")
    bad.hyperparameters.grpo.num_generations = 2
    with pytest.raises(InvalidArgument) as missing:
        await manager.create("", bad)
    assert [v.field for v in missing.value.violations] == ["dataset.rows[0].answer"]
    bad_labels = write_jsonl(
        tmp_path / "bad-kto.jsonl", [*unpaired_rows(2), {**unpaired_rows(1)[0], "label": "yes"}]
    )
    with pytest.raises(InvalidArgument) as label:
        await manager.create("", request(bad_labels, pb.TRAINING_METHOD_KTO))
    assert [v.field for v in label.value.violations] == ["dataset.rows[2].label"]
    no_reward = request(prompts, pb.TRAINING_METHOD_GRPO, batch_size=2)
    with pytest.raises(InvalidArgument) as unrewarded:
        await manager.create("", no_reward)
    assert unrewarded.value.violations[0].field == "job.hyperparameters.grpo.reward_functions"


def _fields(job: pb.TrainingJob) -> dict[str, Any]:
    return {f.name: v for f, v in job.ListFields()}
