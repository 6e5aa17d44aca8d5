"""QLoRA: a LoRA adapter trained on a 4-bit (NF4) quantized base. CUDA and bitsandbytes only.

Off CUDA the method is refused (FAILED_PRECONDITION, reason
QLORA_REQUIRES_CUDA): bitsandbytes does load 4-bit weights on a CPU, and then
computes wrong LoRA gradients after any eval-mode forward, silently. That is a
policy refusal, not a missing feature.
"""

from __future__ import annotations

from typing import Any

from server_kit.errors import FailedPrecondition
from trainer_service.datasets import Method
from trainer_service.strategies.base import Device, TrainContext, load_model
from trainer_service.strategies.lora import LoraStrategy


def qlora_available() -> tuple[bool, str]:
    """Whether QLoRA can run here, and why not."""
    import torch

    if not torch.cuda.is_available():
        return False, "QLoRA needs a CUDA GPU; this trainer has none (use LoRA, or a trainer with CUDA)"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:
        return False, f"QLoRA needs bitsandbytes, which does not import here: {error}"
    return True, ""


class QloraStrategy(LoraStrategy):
    """LoRA on a 4-bit NF4 base (bf16 compute); saves the adapter folder."""

    method = Method.QLORA
    produces_adapter = True

    def validate(self) -> None:
        ok, why = qlora_available()
        if not ok:
            raise FailedPrecondition(why, reason="QLORA_REQUIRES_CUDA", metadata={"method": "QLORA"})

    def load_base(self, ctx: TrainContext, device: Device) -> Any:
        import torch
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        self.validate()
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = load_model(
            ctx.base_model_path,
            device,
            allow_remote_code=ctx.allow_remote_code,
            quantization_config=quantization,
            device_map={"": 0},
        )
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
