"""Hyperparameters: the documented defaults, range checks, and the proto round trip.

`resolve(method, proto)` fills every unset field with its default for the
method and checks ranges (InvalidArgument with one violation per bad field,
`job.hyperparameters.learning_rate`, ...). The result is stored on the job,
so a job shows exactly what it trains with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from modelyard.trainer.v1 import trainer_service_pb2 as pb
from server_kit.errors import FieldViolation, InvalidArgument
from trainer_service.datasets import DEFAULT_EVAL_SPLIT, DEFAULT_MAX_SEQ_LENGTH, Method

DEFAULT_LEARNING_RATE = {
    Method.LORA: 2e-4,
    Method.QLORA: 2e-4,
    Method.FULL: 2e-5,
    Method.DPO: 5e-6,
    Method.ORPO: 8e-6,
    Method.KTO: 5e-6,
    Method.REWARD: 2e-5,
    Method.GRPO: 1e-5,
}
BETA_METHODS = (Method.DPO, Method.ORPO, Method.KTO)
"""Methods with a beta (`dpo_beta`): DPO's and KTO's beta, ORPO's lambda."""
LR_SCHEDULERS = ("linear", "cosine", "constant")
ALL_LINEAR = "all-linear"
PREFIX = "job.hyperparameters"


@dataclass
class Hyperparams:
    """Every hyperparameter of a job, with defaults filled in."""

    epochs: float = 1.0
    max_steps: int | None = None
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH
    seed: int = 42
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    eval_split: float = DEFAULT_EVAL_SPLIT
    eval_steps: int | None = None
    save_steps: int = 50
    weight_decay: float = 0.0
    dpo_beta: float = 0.1
    grpo_reward_functions: list[str] = field(default_factory=list)
    grpo_reward_model: str = ""
    grpo_num_generations: int = 4
    grpo_max_completion_length: int = 64
    grpo_temperature: float = 1.0

    @property
    def effective_batch_size(self) -> int:
        """Rows per optimizer step (one process)."""
        return self.batch_size * self.gradient_accumulation_steps

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for the worker's spec and the output's training_config.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hyperparams:
        """The inverse of `to_dict`."""
        return cls(**data)

    def to_proto(self, method: Method) -> pb.Hyperparameters:
        """The filled-in `Hyperparameters` message stored on the job."""
        proto = pb.Hyperparameters(
            epochs=self.epochs,
            learning_rate=self.learning_rate,
            lr_scheduler=self.lr_scheduler,
            warmup_ratio=self.warmup_ratio,
            batch_size=self.batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            max_seq_length=self.max_seq_length,
            seed=self.seed,
            eval_split=self.eval_split,
            save_steps=self.save_steps,
            weight_decay=self.weight_decay,
        )
        if self.max_steps is not None:
            proto.max_steps = self.max_steps
        if self.eval_steps is not None:
            proto.eval_steps = self.eval_steps
        if method != Method.FULL:
            proto.lora.r = self.lora_r
            proto.lora.alpha = self.lora_alpha
            proto.lora.dropout = self.lora_dropout
            proto.lora.target_modules.extend(self.lora_target_modules)
        if method in BETA_METHODS:
            proto.dpo_beta = self.dpo_beta
        if method == Method.GRPO:
            proto.grpo.reward_functions.extend(self.grpo_reward_functions)
            proto.grpo.reward_model = self.grpo_reward_model
            proto.grpo.num_generations = self.grpo_num_generations
            proto.grpo.max_completion_length = self.grpo_max_completion_length
            proto.grpo.temperature = self.grpo_temperature
        return proto


def _get(proto: Any, name: str, default: Any) -> Any:
    return getattr(proto, name) if proto.HasField(name) else default


def resolve(method: Method, proto: pb.Hyperparameters) -> Hyperparams:
    """Defaults filled in and ranges checked; InvalidArgument listing every bad field."""
    h = Hyperparams(
        epochs=_get(proto, "epochs", 1.0),
        max_steps=_get(proto, "max_steps", None),
        learning_rate=_get(proto, "learning_rate", DEFAULT_LEARNING_RATE[method]),
        lr_scheduler=proto.lr_scheduler or "linear",
        warmup_ratio=_get(proto, "warmup_ratio", 0.0),
        batch_size=_get(proto, "batch_size", 4),
        gradient_accumulation_steps=_get(proto, "gradient_accumulation_steps", 1),
        max_seq_length=_get(proto, "max_seq_length", DEFAULT_MAX_SEQ_LENGTH),
        seed=_get(proto, "seed", 42),
        lora_r=_get(proto.lora, "r", 8),
        lora_alpha=_get(proto.lora, "alpha", 16.0),
        lora_dropout=_get(proto.lora, "dropout", 0.05),
        lora_target_modules=list(proto.lora.target_modules) or [ALL_LINEAR],
        eval_split=_get(proto, "eval_split", DEFAULT_EVAL_SPLIT),
        eval_steps=_get(proto, "eval_steps", None),
        save_steps=_get(proto, "save_steps", 50),
        weight_decay=_get(proto, "weight_decay", 0.0),
        dpo_beta=_get(proto, "dpo_beta", 0.1),
        grpo_reward_functions=list(proto.grpo.reward_functions),
        grpo_reward_model=proto.grpo.reward_model,
        grpo_num_generations=_get(proto.grpo, "num_generations", 4),
        grpo_max_completion_length=_get(proto.grpo, "max_completion_length", 64),
        grpo_temperature=_get(proto.grpo, "temperature", 1.0),
    )
    bad: list[FieldViolation] = []

    def check(ok: bool, name: str, rule: str) -> None:
        if not ok:
            bad.append(FieldViolation(f"{PREFIX}.{name}", rule))

    check(math.isfinite(h.epochs) and h.epochs > 0, "epochs", "must be > 0")
    check(h.max_steps is None or h.max_steps >= 1, "max_steps", "must be >= 1")
    check(math.isfinite(h.learning_rate) and 0 < h.learning_rate < 1, "learning_rate", "must be in (0, 1)")
    check(h.lr_scheduler in LR_SCHEDULERS, "lr_scheduler", f"must be one of {', '.join(LR_SCHEDULERS)}")
    check(0 <= h.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
    check(1 <= h.batch_size <= 4096, "batch_size", "must be in [1, 4096]")
    check(1 <= h.gradient_accumulation_steps <= 4096, "gradient_accumulation_steps", "must be in [1, 4096]")
    check(8 <= h.max_seq_length <= 1_048_576, "max_seq_length", "must be in [8, 1048576]")
    check(0 <= h.seed < 2**32, "seed", "must be in [0, 2^32)")
    check(0 <= h.eval_split < 1, "eval_split", "must be in [0, 1)")
    check(h.eval_steps is None or h.eval_steps >= 1, "eval_steps", "must be >= 1")
    check(h.eval_steps is None or h.eval_split > 0, "eval_steps", "needs eval_split > 0")
    check(h.save_steps >= 1, "save_steps", "must be >= 1")
    check(0 <= h.weight_decay < 1, "weight_decay", "must be in [0, 1)")
    check(h.dpo_beta > 0, "dpo_beta", "must be > 0")
    if method == Method.GRPO:
        check_grpo(h, check)
    if method != Method.FULL:
        check(1 <= h.lora_r <= 1024, "lora.r", "must be in [1, 1024]")
        check(h.lora_alpha > 0, "lora.alpha", "must be > 0")
        check(0 <= h.lora_dropout < 1, "lora.dropout", "must be in [0, 1)")
        check(
            all(name.strip() for name in h.lora_target_modules),
            "lora.target_modules",
            "names must not be empty",
        )
    if bad:
        raise InvalidArgument(
            "invalid hyperparameters: " + "; ".join(f"{v.field} {v.description}" for v in bad),
            reason="INVALID_HYPERPARAMETERS",
            violations=bad,
        )
    return h


def check_grpo(h: Hyperparams, check: Any) -> None:
    """GRPO's settings: a reward source, known reward functions, generations that fit the batch."""
    from trainer_service.rewards import REWARD_FUNCTIONS

    g = "grpo"
    check(
        bool(h.grpo_reward_functions or h.grpo_reward_model),
        f"{g}.reward_functions",
        f"GRPO needs a reward: name reward functions ({', '.join(REWARD_FUNCTIONS)}) or a reward_model",
    )
    unknown = [name for name in h.grpo_reward_functions if name not in REWARD_FUNCTIONS]
    check(not unknown, f"{g}.reward_functions", f"unknown {unknown}; known: {', '.join(REWARD_FUNCTIONS)}")
    check(2 <= h.grpo_num_generations <= 256, f"{g}.num_generations", "must be in [2, 256]")
    check(
        h.grpo_num_generations < 2 or h.effective_batch_size % h.grpo_num_generations == 0,
        f"{g}.num_generations",
        f"must divide batch_size x gradient_accumulation_steps ({h.effective_batch_size})",
    )
    check(1 <= h.grpo_max_completion_length <= 65536, f"{g}.max_completion_length", "must be in [1, 65536]")
    check(math.isfinite(h.grpo_temperature) and h.grpo_temperature > 0, f"{g}.temperature", "must be > 0")
