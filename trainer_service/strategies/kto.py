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
    TrainResult,
    common_arguments,
    detect_device,
    load_model,
    load_tokenizer,
    lora_config,
    run_trainer,
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

    def train(self, ctx: TrainContext, callbacks: Sequence[Any]) -> TrainResult:
        from datasets import Dataset
        from trl import KTOConfig, KTOTrainer

        device = detect_device()
        tokenizer = load_tokenizer(ctx.base_model_path, allow_remote_code=ctx.allow_remote_code)
        model = load_model(ctx.base_model_path, device, allow_remote_code=ctx.allow_remote_code)
        train_data = Dataset.from_list(unpaired_rows(ctx.rows, ctx.dataset_format))
        eval_data = (
            Dataset.from_list(unpaired_rows(ctx.eval_rows, ctx.dataset_format)) if ctx.eval_rows else None
        )
        args = KTOConfig(
            **common_arguments(ctx, device, has_eval=eval_data is not None), beta=ctx.hyper.dpo_beta
        )
        trainer = KTOTrainer(
            model=model,
            ref_model=None,
            args=args,
            train_dataset=train_data,
            eval_dataset=eval_data,
            processing_class=tokenizer,
            peft_config=lora_config(ctx.hyper),
            callbacks=list(callbacks),
        )
        result = run_trainer(trainer, ctx, perplexity=False)
        return self.save_adapter(trainer, tokenizer, ctx, result)
