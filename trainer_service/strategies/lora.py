"""LoRA: supervised fine-tuning of a peft LoRA adapter with TRL's SFTTrainer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainer_service.datasets import Method
from trainer_service.strategies.base import (
    Device,
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
    sft_dataset,
    write_training_record,
)


class LoraStrategy(Strategy):
    """Trains a LoRA adapter on text, prompt/completion or chat rows; saves the adapter folder."""

    method = Method.LORA
    produces_adapter = True

    def load_base(self, ctx: TrainContext, device: Device) -> Any:
        """The base model to put the adapter on."""
        return load_model(ctx.base_model_path, device, allow_remote_code=ctx.allow_remote_code)

    def peft_config(self, ctx: TrainContext) -> Any:
        """The adapter to train (None trains every weight)."""
        return lora_config(ctx.hyper)

    def train(self, ctx: TrainContext, callbacks: Sequence[Any]) -> TrainResult:
        from trl import SFTConfig, SFTTrainer

        device = detect_device()
        tokenizer = load_tokenizer(ctx.base_model_path, allow_remote_code=ctx.allow_remote_code)
        model = self.load_base(ctx, device)
        train_data = sft_dataset(ctx.rows, ctx.dataset_format, tokenizer)
        eval_data = sft_dataset(ctx.eval_rows, ctx.dataset_format, tokenizer) if ctx.eval_rows else None
        args = SFTConfig(**common_arguments(ctx, device, has_eval=eval_data is not None))
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_data,
            eval_dataset=eval_data,
            processing_class=tokenizer,
            peft_config=self.peft_config(ctx),
            callbacks=list(callbacks),
        )
        result = run_trainer(trainer, ctx, perplexity=True)
        if result.output_dir is None:
            return result
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        self.save(trainer, tokenizer, ctx)
        copy_tokenizer_files(ctx.base_model_path, ctx.output_dir)
        write_training_record(ctx, result.metrics)
        return result

    def save(self, trainer: Any, tokenizer: Any, ctx: TrainContext) -> None:
        """Write the adapter (adapter_config.json, adapter_model.safetensors) and the tokenizer."""
        trainer.model.save_pretrained(str(ctx.output_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(ctx.output_dir))
