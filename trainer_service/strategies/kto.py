"""KTO: Kahneman-Tversky optimisation of a LoRA adapter with TRL's KTOTrainer.

KTO learns from unpaired rows: a prompt, a completion and a label saying
whether the completion is desirable. Preference pairs are unpaired first (the
chosen answer desirable, the rejected one not). The reference model is the
base with the adapter off; the job's `dpo_beta` is KTO's beta.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainer_service.datasets import DatasetFormat, Method
from trainer_service.strategies.base import (
    TrainContext,
)
from trainer_service.strategies.dpo import DpoStrategy, plain


def unpaired_rows(rows: Sequence[dict[str, Any]], fmt: DatasetFormat) -> list[dict[str, Any]]:
    """KTO rows (prompt, completion, label); a preference pair becomes two rows."""
    if fmt == DatasetFormat.PREFERENCE:
        out: list[dict[str, Any]] = []
        for row in rows:
            prompt = plain(row["prompt"])
            out.append({"prompt": prompt, "completion": plain(row["chosen"]), "label": True})
            out.append({"prompt": prompt, "completion": plain(row["rejected"]), "label": False})
        return out
    return [
        {"prompt": plain(row["prompt"]), "completion": plain(row["completion"]), "label": bool(row["label"])}
        for row in rows
    ]


class KtoStrategy(DpoStrategy):
    """Trains a LoRA adapter on desirable/undesirable completions; saves the adapter folder."""

    method = Method.KTO
    produces_adapter = True

    def trl_classes(self) -> tuple[Any, Any]:
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer

    def dataset(self, rows: Sequence[dict[str, Any]], ctx: TrainContext) -> Any:
        from datasets import Dataset

        return Dataset.from_list(unpaired_rows(rows, ctx.dataset_format))
