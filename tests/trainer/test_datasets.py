"""Datasets: loading, format detection, row checks with the model's tokenizer, tokenization."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from server_kit.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.trainer.conftest import chat_rows, preference_rows, write_jsonl
from trainer_service import datasets as ds
from trainer_service.datasets import IGNORE_INDEX, DatasetFormat, Method


def issues_by_row(report: ds.DatasetReport) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for issue in report.issues:
        out.setdefault(issue.row, []).append(issue.field)
    return out


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("text", DatasetFormat.TEXT),
        ("prompt_completion", DatasetFormat.PROMPT_COMPLETION),
        ("chat", DatasetFormat.CHAT),
        ("preference", DatasetFormat.PREFERENCE),
    ],
)
def test_formats_are_detected_and_valid_rows_pass(
    data: dict[str, Path], tokenizer: Any, name: str, fmt: Any
) -> None:
    method = Method.DPO if fmt == DatasetFormat.PREFERENCE else Method.LORA
    validated = ds.validate_dataset(str(data[name]), method, tokenizer=tokenizer, max_seq_length=256)
    assert validated.format == fmt
    assert validated.report.valid, validated.report.issues
    assert validated.report.num_rows == 8
    assert validated.report.max_tokens is not None and 0 < validated.report.max_tokens <= 256


def test_json_parquet_folder_and_cached_dataset_sources_load(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = chat_rows(3)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist([{"text": "a b c"}, {"text": "d e f"}]), tmp_path / "rows.parquet")
    folder = tmp_path / "folder"
    write_jsonl(folder / "part-0.jsonl", rows[:2])
    write_jsonl(folder / "part-1.jsonl", rows[2:])

    assert len(ds.load_rows(str(tmp_path / "rows.json")).rows) == 3
    assert ds.load_rows(str(tmp_path / "rows.parquet")).rows == [{"text": "a b c"}, {"text": "d e f"}]
    assert ds.load_rows(str(folder)).rows == rows

    # A hub dataset already in the local datasets cache is found by name, offline.
    from datasets.packaged_modules.json.json import Json

    cache = tmp_path / "cache"
    builder = Json(
        data_files={"train": str(folder / "part-0.jsonl")}, cache_dir=str(cache), dataset_name="tiny_chat",
        hash="0123abcd", config_id="default",
    )  # fmt: skip
    builder.download_and_prepare()
    (cache / "tiny_chat").rename(cache / "acme___tiny_chat")
    loaded = ds.load_rows("acme/tiny_chat", datasets_cache=cache)
    assert [row["messages"][1]["content"] for row in loaded.rows] == ["The answer is 0.", "The answer is 2."]
    with pytest.raises(NotFound) as missing_split:
        ds.load_rows("acme/tiny_chat", split="test", datasets_cache=cache)
    assert missing_split.value.reason == "DATASET_SPLIT_NOT_FOUND"
    with pytest.raises(NotFound) as missing:
        ds.load_rows("acme/absent", datasets_cache=cache)
    assert missing.value.reason == "DATASET_NOT_FOUND"


def test_paths_outside_the_allowed_roots_are_refused(tmp_path: Path, data: dict[str, Path]) -> None:
    with pytest.raises(InvalidArgument) as error:
        ds.load_rows(str(data["chat"]), roots=[tmp_path.resolve()])
    assert error.value.reason == "PATH_NOT_ALLOWED"


def test_outside_paths_are_refused_whether_or_not_they_exist(tmp_path: Path) -> None:
    """Confinement is checked before existence: the answer tells nothing about files outside."""
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "exists.jsonl").write_text("{}\n", encoding="utf-8")
    for source in (tmp_path / "exists.jsonl", tmp_path / "absent.jsonl", tmp_path / "absent"):
        with pytest.raises(InvalidArgument) as error:
            ds.load_rows(str(source), roots=[root.resolve()])
        assert error.value.reason == "PATH_NOT_ALLOWED", source
    with pytest.raises(NotFound) as missing:
        ds.load_rows(str(root / "absent.jsonl"), roots=[root.resolve()])
    assert missing.value.reason == "DATASET_NOT_FOUND"


@pytest.mark.parametrize("name", ["pipe.jsonl", "pipe"])
def test_a_fifo_as_the_dataset_is_invalid_argument(tmp_path: Path, name: str) -> None:
    import os
    import threading

    fifo = tmp_path / name
    os.mkfifo(fifo)
    caught: list[BaseException] = []

    def load() -> None:
        try:
            ds.load_rows(str(fifo), roots=[tmp_path.resolve()])
        except BaseException as exc:
            caught.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # unblock the reader before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("loading a FIFO blocked")
    assert caught and isinstance(caught[0], InvalidArgument), caught
    assert caught[0].reason == "NOT_A_REGULAR_FILE"


def test_bad_rows_are_reported_by_row_and_field(tmp_path: Path, tokenizer: Any) -> None:
    good = chat_rows(1)[0]
    long_text = " ".join(f"word{i}" for i in range(300))
    rows: list[Any] = [
        good,  # 0: fine
        "{not json",  # 1: not JSON
        [1, 2],  # 2: not an object
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]
        },  # 3: wrong type
        {"messages": [{"role": "user", "content": "hi"}]},  # 4: no assistant turn
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "ok"}]},  # 5: role
        {"messages": []},  # 6: empty
        {"text": "no messages"},  # 7: missing field
        {"messages": [{"role": "user", "content": long_text}, {"role": "assistant", "content": "ok"}]},  # 8
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},  # 9: empty
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    validated = ds.validate_dataset(str(path), Method.LORA, tokenizer=tokenizer, max_seq_length=64)
    report = validated.report
    assert validated.format == DatasetFormat.CHAT
    assert not report.valid
    assert issues_by_row(report) == {
        1: [""],
        2: [""],
        3: ["messages[1].content"],
        4: ["messages"],
        5: ["messages[0].role"],
        6: ["messages"],
        7: ["messages"],
        8: ["messages"],
        9: ["messages[1].content"],
    }
    too_long = next(i for i in report.issues if i.row == 8)
    assert "over max_seq_length 64" in too_long.message

    with pytest.raises(InvalidArgument) as error:
        report.raise_if_invalid()
    assert error.value.reason == "INVALID_DATASET"
    fields = [v.field for v in error.value.violations]
    assert "dataset.rows[3].messages[1].content" in fields
    assert "dataset.rows[1]" in fields
    assert len(fields) == report.total_issues == 9


def test_text_prompt_completion_and_preference_rows_are_checked(tmp_path: Path, tokenizer: Any) -> None:
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "fine"}, {"text": ""}, {"text": 3}])
    report = ds.validate_dataset(str(text), Method.FULL, tokenizer=tokenizer).report
    assert [(i.row, i.field, i.message) for i in report.issues] == [
        (1, "text", "is empty"),
        (2, "text", "must be a string, not a number"),
    ]
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    report = ds.validate_dataset(str(pc), Method.LORA, fmt=DatasetFormat.PROMPT_COMPLETION).report
    assert [(i.row, i.field) for i in report.issues] == [(1, "completion")]
    pairs = [
        *preference_rows(2),
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "x"},
    ]
    pref = write_jsonl(tmp_path / "pref.jsonl", pairs)
    report = ds.validate_dataset(str(pref), Method.DPO, tokenizer=tokenizer).report
    assert [(i.row, i.field) for i in report.issues] == [(2, "rejected"), (3, "rejected")]


def test_the_format_must_fit_the_method(data: dict[str, Path]) -> None:
    with pytest.raises(InvalidArgument) as error:
        ds.validate_dataset(str(data["chat"]), Method.DPO)
    assert error.value.reason == "DATASET_FORMAT_MISMATCH"
    assert error.value.violations[0].field == "dataset.format"
    with pytest.raises(InvalidArgument) as error:
        ds.validate_dataset(str(data["preference"]), Method.LORA)
    assert error.value.reason == "DATASET_FORMAT_MISMATCH"


def test_at_most_100_issues_are_listed_and_the_rest_counted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""} for _ in range(150)])
    report = ds.validate_dataset(str(path), Method.LORA).report
    assert len(report.issues) == 100
    assert report.total_issues == 150


def test_chat_without_a_template_is_refused(tmp_path: Path, data: dict[str, Path], tokenizer: Any) -> None:
    import copy

    no_template = copy.copy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(FailedPrecondition) as error:
        ds.validate_dataset(str(data["chat"]), Method.LORA, tokenizer=no_template)
    assert error.value.reason == "NO_CHAT_TEMPLATE"


def test_chat_rows_train_on_the_assistant_turns_only(tokenizer: Any) -> None:
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ]
    }
    tokenized = ds.tokenize_sft_row(row, DatasetFormat.CHAT, tokenizer)
    assert len(tokenized.input_ids) == len(tokenized.labels)
    trained = [
        t for t, label in zip(tokenized.input_ids, tokenized.labels, strict=True) if label != IGNORE_INDEX
    ]
    text = tokenizer.decode(trained)
    assert "Hello there." in text and "Goodbye." in text
    assert "Be brief" not in text and "Hi" not in text and "Bye" not in text


def test_prompt_completion_rows_train_on_the_completion(tokenizer: Any) -> None:
    tokenized = ds.tokenize_sft_row(
        {"prompt": "Double 2:", "completion": " 4"}, DatasetFormat.PROMPT_COMPLETION, tokenizer
    )
    trained = [
        t for t, label in zip(tokenized.input_ids, tokenized.labels, strict=True) if label != IGNORE_INDEX
    ]
    assert trained[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained[:-1]).strip() == "4"


def test_eval_split_holds_out_a_seeded_fraction() -> None:
    rows = list(range(10))
    train, evaluation = ds.split_rows(rows, 0.2, seed=1)
    assert len(evaluation) == 2 and sorted(train + evaluation) == rows
    assert ds.split_rows(rows, 0.2, seed=1) == (train, evaluation)
    assert ds.split_rows(rows, 0.0, seed=1) == (rows, [])


def test_default_dataset_roots_are_the_data_directory_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer_service.settings import TrainerSettings

    monkeypatch.chdir(tmp_path)
    settings = TrainerSettings(data_dir=tmp_path / "data", datasets_cache=tmp_path / "cache")
    assert settings.resolved_dataset_roots() == [(tmp_path / "data").resolve()]
