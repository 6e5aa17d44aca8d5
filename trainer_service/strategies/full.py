"""Full fine-tune: every weight trained with TRL's SFTTrainer; saves a complete model folder."""

from __future__ import annotations

import shutil
from typing import Any

from trainer_service.datasets import Method
from trainer_service.strategies.base import TrainContext
from trainer_service.strategies.lora import LoraStrategy


class FullStrategy(LoraStrategy):
    """Trains all weights on text, prompt/completion or chat rows; saves weights, config and tokenizer."""

    method = Method.FULL
    produces_adapter = False

    def peft_config(self, ctx: TrainContext) -> Any:
        return None

    def save(self, trainer: Any, tokenizer: Any, ctx: TrainContext) -> None:
        """Write model.safetensors, config.json, generation_config.json and the tokenizer."""
        trainer.model.save_pretrained(str(ctx.output_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(ctx.output_dir))
        generation_config = ctx.base_model_path / "generation_config.json"
        if generation_config.is_file() and not (ctx.output_dir / "generation_config.json").exists():
            shutil.copy2(generation_config, ctx.output_dir / "generation_config.json")
