"""ORPO: odds ratio preference optimisation of a LoRA adapter with TRL's ORPOTrainer.

ORPO adds an odds-ratio preference term to the supervised loss on the chosen
answer, so it needs no reference model and no SFT step first. TRL 1.16 keeps
it in `trl.experimental.orpo`. The job's `dpo_beta` is ORPO's lambda (the
weight of the preference term).
"""

from __future__ import annotations

from typing import Any

from trainer_service.datasets import Method
from trainer_service.strategies.dpo import DpoStrategy


class OrpoStrategy(DpoStrategy):
    """Trains a LoRA adapter on prompt/chosen/rejected pairs; saves the adapter folder."""

    method = Method.ORPO
    produces_adapter = True
    uses_reference_model = False

    def trl_classes(self) -> tuple[Any, Any]:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer
