"""DPO: direct preference optimisation of a LoRA adapter with TRL's DPOTrainer.

The reference model is the base with the adapter switched off
(`ref_model=None` with a `peft_config`), so no second copy of the weights is
loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainer_service.datasets import Method
from trainer_service.strategies.base import (
    Strategy,
    TrainContext,
    TrainResult,
    common_arguments,
    copy_tokenizer_files,
    detect_device,
    load_model,
    load_tokenizer,
    lora_config,
    run_trainer,
    write_training_record,
)


def preference_dataset(rows: Sequence[dict[str, Any]]) -> Any:
    """Preference rows as a `datasets.Dataset` of prompt/chosen/rejected."""
    from datasets import Dataset

    return Dataset.from_list([_pair(row) for row in rows])


def plain(value: Any) -> Any:
    """A string as is; chat messages reduced to role and content (the fields TRL reads)."""
    if isinstance(value, list):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return value


def _pair(row: dict[str, Any]) -> dict[str, Any]:
    """A preference row with only the fields TRL reads."""
    return {
        "prompt": plain(row["prompt"]),
        "chosen": plain(row["chosen"]),
        "rejected": plain(row["rejected"]),
    }


class DpoStrategy(Strategy):
    """Trains a LoRA adapter on prompt/chosen/rejected pairs; saves the adapter folder.

    The preference methods built on it (ORPO, KTO) differ only in their TRL classes, their
    rows (`dataset`) and whether the trainer takes a reference model."""

    method = Method.DPO
    produces_adapter = True
    #: The trainer takes `ref_model=None`: the base with the adapter off is the reference.
    uses_reference_model = True

    def trl_classes(self) -> tuple[Any, Any]:
        """TRL's config and trainer classes of the method."""
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer

    def dataset(self, rows: Sequence[dict[str, Any]], ctx: TrainContext) -> Any:
        """The method's rows as a `datasets.Dataset`."""
        return preference_dataset(rows)

    def train(self, ctx: TrainContext, callbacks: Sequence[Any]) -> TrainResult:
        config_class, trainer_class = self.trl_classes()
        device = detect_device()
        tokenizer = load_tokenizer(ctx.base_model_path, allow_remote_code=ctx.allow_remote_code)
        model = load_model(ctx.base_model_path, device, allow_remote_code=ctx.allow_remote_code)
        train_data = self.dataset(ctx.rows, ctx)
        eval_data = self.dataset(ctx.eval_rows, ctx) if ctx.eval_rows else None
        args = config_class(
            **common_arguments(ctx, device, has_eval=eval_data is not None), beta=ctx.hyper.dpo_beta
        )
        reference = {"ref_model": None} if self.uses_reference_model else {}
        trainer = trainer_class(
            model=model,
            **reference,
            args=args,
            train_dataset=train_data,
            eval_dataset=eval_data,
            processing_class=tokenizer,
            peft_config=lora_config(ctx.hyper),
            callbacks=list(callbacks),
        )
        result = run_trainer(trainer, ctx, perplexity=False)
        return self.save_adapter(trainer, tokenizer, ctx, result)

    def save_adapter(
        self, trainer: Any, tokenizer: Any, ctx: TrainContext, result: TrainResult
    ) -> TrainResult:
        """Save the trained adapter, the tokenizer and the training record (unless stopped early)."""
        if result.output_dir is None:
            return result
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        model_out: Any = trainer.model
        model_out.save_pretrained(str(ctx.output_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(ctx.output_dir))
        copy_tokenizer_files(ctx.base_model_path, ctx.output_dir)
        write_training_record(ctx, result.metrics)
        return result
