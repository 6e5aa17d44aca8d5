"""Reward modelling with TRL's RewardTrainer: a sequence-classification model scoring answers.

The base causal LM is loaded as `AutoModelForSequenceClassification` with one
label (its LM head replaced by a fresh `score` head), a LoRA adapter plus the
score head are trained on preference pairs (the chosen answer must score above
the rejected one: a Bradley-Terry loss), and the adapter is merged into the
weights. The output is a complete `...ForSequenceClassification` model, which
the catalog detects as task REWARD_MODEL and GRPO jobs can use as their reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer_service.datasets import Method
from trainer_service.strategies.base import (
    OutputCheckError,
    Strategy,
    TrainContext,
    TrainResult,
    common_arguments,
    copy_tokenizer_files,
    detect_device,
    load_tokenizer,
    lora_config,
    run_trainer,
    write_training_record,
)
from trainer_service.strategies.dpo import preference_dataset


def load_reward_model(
    path: Path, device_dtype: str, *, tokenizer: Any, allow_remote_code: bool = False
) -> Any:
    """The model at `path` as a one-label sequence classifier (a new score head for a causal LM)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, dtype=getattr(torch, device_dtype), trust_remote_code=allow_remote_code
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


class RewardStrategy(Strategy):
    """Trains a reward model on prompt/chosen/rejected pairs; saves a full sequence-classification model."""

    method = Method.REWARD
    produces_adapter = False

    def train(self, ctx: TrainContext, callbacks: Sequence[Any]) -> TrainResult:
        from trl import RewardConfig, RewardTrainer

        device = detect_device()
        tokenizer = load_tokenizer(ctx.base_model_path, allow_remote_code=ctx.allow_remote_code)
        model = load_reward_model(
            ctx.base_model_path,
            device.dtype_name,
            tokenizer=tokenizer,
            allow_remote_code=ctx.allow_remote_code,
        )
        train_data = preference_dataset(ctx.rows)
        eval_data = preference_dataset(ctx.eval_rows) if ctx.eval_rows else None
        args = RewardConfig(**common_arguments(ctx, device, has_eval=eval_data is not None))
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=train_data,
            eval_dataset=eval_data,
            processing_class=tokenizer,
            peft_config=lora_config(ctx.hyper, task_type="SEQ_CLS", modules_to_save=["score"]),
            callbacks=list(callbacks),
        )
        result = run_trainer(trainer, ctx, perplexity=False)
        if result.output_dir is None:
            return result
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        trained: Any = trainer.model
        merged = trained.merge_and_unload() if hasattr(trained, "merge_and_unload") else trained
        merged.config.pad_token_id = tokenizer.pad_token_id
        merged.save_pretrained(str(ctx.output_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(ctx.output_dir))
        copy_tokenizer_files(ctx.base_model_path, ctx.output_dir)
        generation_config = ctx.output_dir / "generation_config.json"
        if generation_config.exists():  # a classifier does not generate
            generation_config.unlink()
        write_training_record(ctx, result.metrics)
        return result

    def check_output(self, output_dir: Path, base_model_path: Path) -> str:
        """The saved model loads as a one-label classifier and scores two answers with finite numbers."""
        import torch

        if not (output_dir / "config.json").is_file() or not any(output_dir.glob("*.safetensors")):
            raise OutputCheckError("missing files in the output: config.json or *.safetensors")
        try:
            tokenizer = load_tokenizer(output_dir)
            model = load_reward_model(output_dir, detect_device().dtype_name, tokenizer=tokenizer)
            model.eval()
            batch = tokenizer(["Hello, how are you?", "Hello"], return_tensors="pt", padding=True)
            with torch.no_grad():
                scores = model(**batch).logits
        except Exception as error:
            raise OutputCheckError(f"the reward model does not load and score: {error}") from error
        if scores.shape[-1] != 1 or not bool(torch.isfinite(scores).all()):
            raise OutputCheckError(f"the reward model scores are not one finite number each: {scores}")
        return "scores " + ", ".join(f"{float(v):.4g}" for v in scores[:, 0])


__all__ = ["RewardStrategy", "load_reward_model"]
