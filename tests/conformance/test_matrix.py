"""The conformance matrix as a test: the catalog never predicts that an engine runs a model
it cannot run (0 false COMPATIBLE), on every tiny architecture of `tinymodels.zoo` and every
text engine of the default worker (vLLM on the CPU, transformers). See `matrix.py`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conformance.matrix import CI_KEYS, DOC, ENGINES, Row, all_models, run

pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[Row]:
    """The CI selection of the zoo tried on every engine (one engine at a time: vLLM's take
    seconds each)."""
    return asyncio.run(run(all_models(CI_KEYS), tmp_path_factory.mktemp("matrix"), log=False))


def test_the_zoo_covers_at_least_25_model_types(rows: list[Row]) -> None:
    assert len({row.spec.model_type for row in rows}) >= 25
    assert len(rows) == len(CI_KEYS)


def test_no_engine_is_predicted_to_run_a_model_it_cannot_run(rows: list[Row]) -> None:
    false_compatible = [
        f"{row.spec.key} on {name}: predicted to run, actually {row.cells[name].actual}"
        for row in rows
        for name in ENGINES
        if row.cells[name].predicted_runs and not row.cells[name].runs
    ]
    assert false_compatible == []


def test_the_default_worker_serves_every_model_on_an_engine_that_runs_it(rows: list[Row]) -> None:
    """With vLLM and transformers, a model some engine runs is served on an engine that runs
    it; one no engine runs is refused up front (kimi_linear: in a worker that runs vLLM too,
    vLLM's own config class replaces transformers', and both dry runs say so)."""
    unserved = [
        row.spec.key
        for row in rows
        if (row.chosen and not row.cells[row.chosen].runs)
        or (not row.chosen and any(cell.runs for cell in row.cells.values()))
    ]
    assert unserved == []


def test_vllm_refuses_head_size_16_before_loading_and_transformers_serves_it(rows: list[Row]) -> None:
    row = next(r for r in rows if r.spec.key == "qwen2-head16")
    vllm = row.cells["vllm"]
    assert vllm.rules == "INCOMPATIBLE" and "head size 16" in vllm.rules_reason
    assert "head size 16" in vllm.dry_run
    assert not vllm.runs  # the engine really cannot: its first step fails
    assert row.chosen == "transformers" and row.cells["transformers"].runs


def test_the_committed_matrix_lists_every_zoo_model() -> None:
    """docs/compatibility-matrix.md is regenerated when the zoo changes."""
    text = Path(DOC).read_text(encoding="utf-8")
    missing = [model.key for model in all_models() if f"| {model.key} |" not in text]
    assert missing == [], "run: .venv/bin/python -m tests.conformance.matrix"
    assert ", 0 false COMPATIBLE," in text, "the committed matrix shows a false COMPATIBLE"
