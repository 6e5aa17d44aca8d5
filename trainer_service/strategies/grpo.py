"""GRPO: group relative policy optimisation (RLHF) of a LoRA adapter with TRL's GRPOTrainer.

For every prompt the policy samples `num_generations` completions; each is
scored by the job's reward (the sum of its built-in reward functions,
`trainer_service.rewards`, and of its catalog reward model's score), and the
policy moves towards the completions that scored above their group's mean.
The reference for the KL term is the base with the adapter off. Rows are
prompt-only; their other fields (e.g. `answer`) reach the reward functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainer_service.datasets import Method
from trainer_service.rewards import reward_function
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


def prompt_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prompt-only rows for TRL: the prompt cleaned, the other (string) fields kept for the rewards."""
    out = []
    for row in rows:
        extra = {k: v for k, v in row.items() if k != "prompt" and isinstance(v, str | int | float | bool)}
        out.append({**extra, "prompt": plain(row["prompt"])})
    return out


class GrpoStrategy(DpoStrategy):
    """Trains a LoRA adapter by sampling and rewarding completions; saves the adapter folder."""

    method = Method.GRPO
    produces_adapter = True

    def reward_funcs(self, ctx: TrainContext, dtype: str) -> tuple[list[Any], list[Any]]:
        """The reward functions of the job, and a tokenizer for each (None for functions)."""
        h = ctx.hyper
        funcs: list[Any] = [
            reward_function(name, max_completion_length=h.grpo_max_completion_length)
            for name in h.grpo_reward_functions
        ]
        tokenizers: list[Any] = [None] * len(funcs)
        if ctx.reward_model_path is not None:
            from trainer_service.strategies.reward import load_reward_model

            reward_tokenizer = load_tokenizer(ctx.reward_model_path, allow_remote_code=ctx.allow_remote_code)
            reward_model = load_reward_model(
                ctx.reward_model_path,
                dtype,
                tokenizer=reward_tokenizer,
                allow_remote_code=ctx.allow_remote_code,
            )
            funcs.append(reward_model)
            tokenizers.append(reward_tokenizer)
        return funcs, tokenizers

    def train(self, ctx: TrainContext, callbacks: Sequence[Any]) -> TrainResult:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        h = ctx.hyper
        device = detect_device()
        tokenizer = load_tokenizer(ctx.base_model_path, allow_remote_code=ctx.allow_remote_code)
        model = load_model(ctx.base_model_path, device, allow_remote_code=ctx.allow_remote_code)
        train_data = Dataset.from_list(prompt_rows(ctx.rows))
        eval_data = Dataset.from_list(prompt_rows(ctx.eval_rows)) if ctx.eval_rows else None
        arguments = common_arguments(ctx, device, has_eval=eval_data is not None)
        arguments.pop("max_length")  # GRPO bounds the completion instead
        arguments["per_device_eval_batch_size"] = h.grpo_num_generations  # one prompt's group per batch
        args = GRPOConfig(
            **arguments,
            num_generations=h.grpo_num_generations,
            max_completion_length=h.grpo_max_completion_length,
            temperature=h.grpo_temperature,
        )
        funcs, reward_tokenizers = self.reward_funcs(ctx, device.dtype_name)
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=funcs,
            args=args,
            train_dataset=train_data,
            eval_dataset=eval_data,
            processing_class=tokenizer,
            reward_processing_classes=reward_tokenizers if any(reward_tokenizers) else None,
            peft_config=lora_config(ctx.hyper),
            callbacks=list(callbacks),
        )
        result = run_trainer(trainer, ctx, perplexity=False)
        return self.save_adapter(trainer, tokenizer, ctx, result)
