"""ORPO: odds ratio preference optimisation of a LoRA adapter with TRL's ORPOTrainer.

ORPO adds an odds-ratio preference term to the supervised loss on the chosen
answer, so it needs no reference model and no SFT step first. TRL 1.16 keeps
it in `trl.experimental.orpo`. The job's `dpo_beta` is ORPO's lambda (the
weight of the preference term).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainer_service.datasets import Method
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
from trainer_service.strategies.dpo import DpoStrategy, preference_dataset


class OrpoStrategy(DpoStrategy):
    """Trains a LoRA adapter on prompt/chosen/rejected pairs; saves the adapter folder."""

    method = Method.ORPO
    produces_adapter = True

    def train(self, ctx: TrainContext, callbacks: Sequence[Any]) -> TrainResult:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        device = detect_device()
        tokenizer = load_tokenizer(ctx.base_model_path, allow_remote_code=ctx.allow_remote_code)
        model = load_model(ctx.base_model_path, device, allow_remote_code=ctx.allow_remote_code)
        train_data = preference_dataset(ctx.rows)
        eval_data = preference_dataset(ctx.eval_rows) if ctx.eval_rows else None
        args = ORPOConfig(
            **common_arguments(ctx, device, has_eval=eval_data is not None), beta=ctx.hyper.dpo_beta
        )
        trainer = ORPOTrainer(
            model=model,
            args=args,
            train_dataset=train_data,
            eval_dataset=eval_data,
            processing_class=tokenizer,
            peft_config=lora_config(ctx.hyper),
            callbacks=list(callbacks),
        )
        result = run_trainer(trainer, ctx, perplexity=False)
        return self.save_adapter(trainer, tokenizer, ctx, result)
