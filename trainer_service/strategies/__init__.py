"""Training methods, one strategy per method behind one interface (`Strategy`)."""

from __future__ import annotations

from trainer_service.datasets import Method
from trainer_service.strategies.base import Strategy


def strategy_for(method: Method) -> Strategy:
    """The strategy that trains `method` (imports its module only when asked)."""
    if method == Method.LORA:
        from trainer_service.strategies.lora import LoraStrategy

        return LoraStrategy()
    if method == Method.FULL:
        from trainer_service.strategies.full import FullStrategy

        return FullStrategy()
    if method == Method.DPO:
        from trainer_service.strategies.dpo import DpoStrategy

        return DpoStrategy()
    if method == Method.QLORA:
        from trainer_service.strategies.qlora import QloraStrategy

        return QloraStrategy()
    if method == Method.ORPO:
        from trainer_service.strategies.orpo import OrpoStrategy

        return OrpoStrategy()
    if method == Method.KTO:
        from trainer_service.strategies.kto import KtoStrategy

        return KtoStrategy()
    if method == Method.REWARD:
        from trainer_service.strategies.reward import RewardStrategy

        return RewardStrategy()
    if method == Method.GRPO:
        from trainer_service.strategies.grpo import GrpoStrategy

        return GrpoStrategy()
    raise ValueError(f"no strategy for {method}")


__all__ = ["Strategy", "strategy_for"]
