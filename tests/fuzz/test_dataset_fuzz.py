"""Trainer dataset validation on generated files: only domain errors, never a crash.

`validate_dataset` is what the trainer's ValidateDataset and CreateTrainingJob
run on a dataset file. Rows of every shape (junk lines, wrong types, deep JSON,
binary files, corrupt parquet) must end in a report of bad rows or a domain
error with a non-INTERNAL status, never another exception.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from server_kit.errors import ModelyardError
from tests.fuzz.conftest import BAD_CODES, FUZZ
from tinymodels.llm import build_llm
from trainer_service.datasets import Method, validate_dataset

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "", "bot"]) | SCALARS},
        optional={"content": JSON_VALUES},
    ),
    max_size=4,
)
KEYS = ["text", "prompt", "completion", "messages", "chosen", "rejected"]
ROWS = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), st.one_of(JSON_VALUES, MESSAGES), max_size=4),
    JSON_VALUES,
)
LINES = st.one_of(
    ROWS.map(json.dumps),
    st.text(max_size=60).filter(lambda t: "\n" not in t and "\r" not in t),
    st.sampled_from(["[" * 100_000, '{"text": ' + "9" * 5000 + "}", "{", "null", '{"text": "\\ud800"}']),
)
FILES = st.one_of(
    st.tuples(
        st.just(".jsonl"), st.lists(LINES, min_size=0, max_size=8).map(lambda ls: "\n".join(ls).encode())
    ),
    st.tuples(st.just(".json"), st.lists(ROWS, max_size=6).map(lambda rs: json.dumps(rs).encode())),
    st.tuples(st.sampled_from([".jsonl", ".json", ".parquet"]), st.binary(max_size=300)),
    st.tuples(st.just(".parquet"), st.binary(max_size=100).map(lambda b: b"PAR1" + b + b"PAR1")),
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny Llama's tokenizer (ChatML template): rows are also tokenized and measured."""
    return AutoTokenizer.from_pretrained(
        build_llm(tmp_path_factory.mktemp("fuzz-tok") / "tiny", arch="llama")
    )


@FUZZ
@given(file=FILES, method=st.sampled_from(list(Method)), measure=st.booleans())
def test_validate_dataset_on_generated_files(
    tokenizer: Any,
    tmp_path_factory: pytest.TempPathFactory,
    file: tuple[str, bytes],
    method: Method,
    measure: bool,
) -> None:
    suffix, content = file
    path = tmp_path_factory.mktemp("dataset") / f"data{suffix}"
    path.write_bytes(content)
    try:
        result = validate_dataset(
            str(path),
            method,
            tokenizer=tokenizer if measure else None,
            max_seq_length=64,
            roots=[path.parent],
        )
    except ModelyardError as error:
        assert error.code not in BAD_CODES, error
        assert error.code != grpc.StatusCode.OK
        return
    # A report: every reported issue names a row that exists.
    assert result.report.num_rows == len(result.rows)
    assert all(0 <= issue.row <= len(result.rows) for issue in result.report.issues)


@FUZZ
@given(suffix=st.sampled_from([".jsonl", ".json", ".parquet", "", ".txt"]), in_folder=st.booleans())
def test_special_files_as_datasets(
    tmp_path_factory: pytest.TempPathFactory, suffix: str, in_folder: bool
) -> None:
    """A FIFO as the dataset (or inside its folder): a domain error or no rows, never a blocked read."""
    import os
    import threading

    folder = tmp_path_factory.mktemp("special")
    fifo = folder / f"data{suffix}"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            validate_dataset(str(folder if in_folder else fifo), Method.LORA, roots=[folder])
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading the dataset blocked on a FIFO")
    error = outcome[0]
    if error is not None:
        assert isinstance(error, ModelyardError), repr(error)
        assert error.code not in BAD_CODES, error


PAGE_KEYS = st.lists(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63 - 2, max_value=2**80),
        st.integers(max_value=-(2**63) + 1, min_value=-(2**80)), st.floats(), st.text(max_size=20),
    ),
    max_size=3,
)  # fmt: skip


@FUZZ
@given(keys=PAGE_KEYS)
def test_list_jobs_with_forged_page_tokens(tmp_path_factory: pytest.TempPathFactory, keys: list[Any]) -> None:
    """ListTrainingJobs' page tokens: any key list a forger puts in is a domain error or a page."""
    from server_kit import filtering, paging
    from trainer_service.db import migrate
    from trainer_service.jobs import JobStore

    url = f"sqlite:///{tmp_path_factory.mktemp('jobs') / 'jobs.db'}"
    migrate(url)
    store = JobStore(url)
    try:
        token = paging.encode_page_token(keys, filtering.canonical([]))
        try:
            store.list_jobs(page_size=2, page_token=token)
        except ModelyardError as error:
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    finally:
        store.close()
