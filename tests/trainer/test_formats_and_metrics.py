"""Alpaca and ShareGPT datasets, task metrics on the eval split, and the metric history.

Users bring Alpaca (instruction/input/output) and ShareGPT (conversations of
from/value) files as they are: both are detected, checked by row, and train.
A summarization job reports ROUGE on its (default, seeded) eval split while it
runs and on the registered model; a question-answering job exact match and
token F1. Every logged step is kept with the job and read back page by page.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clients.catalog import AsyncCatalogClient
from modelyard.trainer.v1 import trainer_service_pb2 as pb
from server_kit.errors import InvalidArgument
from tests.trainer.conftest import write_jsonl
from tests.trainer.test_manager import follow, request, states
from trainer_service import datasets as ds
from trainer_service.evaluation import rouge, squad
from trainer_service.manager import EVAL, JobManager


def alpaca_rows(n: int = 10) -> list[dict[str, Any]]:
    return [
        {
            "instruction": "Summarize the text.",
            "input": f"The number {i} is small and the number {i + 100} is large.",
            "output": f"{i} small, {i + 100} large.",
        }
        for i in range(n)
    ]


def sharegpt_rows(n: int = 10) -> list[dict[str, Any]]:
    return [
        {
            "conversations": [
                {"from": "system", "value": "Answer briefly."},
                {"from": "human", "value": f"What is {i} plus {i}?"},
                {"from": "gpt", "value": f"{2 * i}"},
            ]
        }
        for i in range(n)
    ]


def test_alpaca_and_sharegpt_are_detected_checked_and_rendered(tmp_path: Path, tokenizer: Any) -> None:
    alpaca = ds.validate_dataset(
        str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(3))), ds.Method.LORA, tokenizer=tokenizer
    )
    assert alpaca.format == ds.DatasetFormat.ALPACA and alpaca.report.valid
    sharegpt = ds.validate_dataset(
        str(write_jsonl(tmp_path / "s.jsonl", sharegpt_rows(3))), ds.Method.FULL, tokenizer=tokenizer
    )
    assert sharegpt.format == ds.DatasetFormat.SHAREGPT and sharegpt.report.valid

    # Alpaca trains on the output only; ShareGPT on the gpt turns only, through the chat template.
    tokenized = ds.tokenize_sft_row(alpaca_rows(1)[0], ds.DatasetFormat.ALPACA, tokenizer)
    trained = [t for t, label in zip(tokenized.input_ids, tokenized.labels, strict=True) if label != -100]
    assert tokenizer.decode(trained, skip_special_tokens=True).strip() == "0 small, 100 large."
    chat = ds.tokenize_sft_row(sharegpt_rows(1)[0], ds.DatasetFormat.SHAREGPT, tokenizer)
    as_chat = ds.tokenize_sft_row(
        {"messages": [{"role": r, "content": c} for r, c in (("system", "Answer briefly."),
         ("user", "What is 0 plus 0?"), ("assistant", "0"))]},
        ds.DatasetFormat.CHAT, tokenizer,
    )  # fmt: skip
    assert chat == as_chat

    bad = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "hi"}]},
        {"instruction": "x", "output": 3},
    ]
    report = ds.check_rows(bad[:2], ds.DatasetFormat.SHAREGPT, tokenizer=tokenizer)
    assert [(i.row, i.field) for i in report.issues] == [(0, "conversations[1].from"), (1, "conversations")]
    report = ds.check_rows(bad[2:], ds.DatasetFormat.ALPACA)
    assert [(i.row, i.field, i.message) for i in report.issues] == [
        (0, "output", "must be a string, not a number")
    ]


def test_task_metrics_are_the_maintained_definitions() -> None:
    assert rouge(["the cat sat"], ["the cat sat"]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge(["a dog"], ["the cat sat"])["rouge1"] == 0.0
    scores = squad(["The answer is 4.", "Paris"], ["4", "paris"])
    assert scores["exact_match"] == 0.5 and 0.5 < scores["f1"] < 1.0


def test_the_default_eval_split_is_ten_percent_capped_and_at_least_one_row() -> None:
    assert ds.eval_row_count(8, ds.DEFAULT_EVAL_SPLIT) == 1
    assert ds.eval_row_count(500, ds.DEFAULT_EVAL_SPLIT) == 50
    assert ds.eval_row_count(1_000_000, ds.DEFAULT_EVAL_SPLIT) == ds.MAX_EVAL_ROWS
    assert ds.eval_row_count(8, 0.0) == 0 and ds.eval_row_count(1, 0.5) == 0


@pytest.mark.slow
async def test_alpaca_and_sharegpt_jobs_train_report_task_metrics_and_keep_their_history(
    make_manager: Callable[..., JobManager], tmp_path: Path, catalog_client: AsyncCatalogClient
) -> None:
    manager = make_manager(max_concurrent_jobs=2)
    await manager.start()
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())
    summarize = request(alpaca, output="tiny-summarizer")
    summarize.task = pb.TRAINING_TASK_SUMMARIZATION
    summary_job = await manager.create("summarize", summarize)
    assert summary_job.dataset.format == pb.DATASET_FORMAT_ALPACA
    assert (summary_job.train_row_count, summary_job.eval_row_count) == (9, 1)
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt_rows())
    answer = request(sharegpt, pb.TRAINING_METHOD_FULL, max_steps=2)
    answer.task = pb.TRAINING_TASK_QUESTION_ANSWERING
    qa_job = await manager.create("answer", answer)
    assert qa_job.dataset.format == pb.DATASET_FORMAT_SHAREGPT

    summary_events, qa_events = await asyncio.gather(
        follow(manager, summary_job.name), follow(manager, qa_job.name)
    )
    for events in (summary_events, qa_events):
        assert states(events)[-1] == "SUCCEEDED", events[-1].job.error
    rouge_seen = [e.job.progress.eval_metrics for e in summary_events if e.type == EVAL]
    assert {"rouge1", "rouge2", "rougeL"} <= set(rouge_seen[-1])
    assert all(0.0 <= rouge_seen[-1][k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL"))
    assert {"exact_match", "f1"} <= set(qa_events[-1].job.progress.eval_metrics)
    model = await catalog_client.get_model("tiny-summarizer")
    assert {"eval-rouge1", "eval-rouge2", "eval-rougel", "eval-loss"} <= set(model.labels)
    assert model.labels["eval-rows"] == "1" and model.labels["training-task"] == "summarization"

    # Every logged step is kept with the job, in step order, page by page.
    points: list[pb.MetricPoint] = []
    token = ""
    while True:
        page, token = await manager.list_metrics(summary_job.name, page_size=2, page_token=token)
        assert len(page) <= 2
        points.extend(page)
        if not token:
            break
    train = [p for p in points if p.kind == pb.METRIC_KIND_TRAIN]
    assert [p.step for p in train] == [1, 2, 3, 4] and all("loss" in p.values for p in train)
    evals = [p for p in points if p.kind == pb.METRIC_KIND_EVAL]
    assert [p.step for p in evals] == [4]
    assert {"eval_loss", "eval_perplexity", "eval_rouge1"} <= set(evals[0].values)
    with pytest.raises(InvalidArgument):
        await manager.list_metrics(qa_job.name, page_token=token or "bogus")

    # A task needs reference answers: text rows cannot be scored for summarization.
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"row {i}"} for i in range(4)])
    bad = request(text)
    bad.task = pb.TRAINING_TASK_SUMMARIZATION
    with pytest.raises(InvalidArgument) as mismatch:
        await manager.create("", bad)
    assert mismatch.value.reason == "TASK_FORMAT_MISMATCH"
