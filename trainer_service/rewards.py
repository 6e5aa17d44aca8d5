"""Built-in reward functions of GRPO jobs, by name (`GrpoParams.reward_functions`).

Each takes TRL's reward-function arguments (`prompts`, `completions` — strings,
or lists of chat messages for conversational prompts — and the dataset's other
columns as keyword lists) and returns one float per completion. A job's reward
is the sum of its functions' rewards and of its catalog reward model's score
(TRL's `reward_funcs`, weights 1).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

RewardFunction = Callable[..., list[float]]

ANSWER_FIELD = "answer"


def completion_text(completion: Any) -> str:
    """The text of a completion: the string, or the contents of its messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return " ".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def _normalize(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def answer_match(completions: Sequence[Any], answer: Sequence[str] | None = None, **_: Any) -> list[float]:
    """1.0 when the completion contains the row's `answer` (case and punctuation ignored), else 0.0."""
    if answer is None:
        raise ValueError("answer_match needs an `answer` field in every row")
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        wanted = _normalize(str(expected))
        rewards.append(1.0 if wanted and wanted in _normalize(completion_text(completion)) else 0.0)
    return rewards


def repetition_penalty(completions: Sequence[Any], **_: Any) -> list[float]:
    """Minus the share of repeated word trigrams (0.0: no repetition, down to -1.0)."""
    rewards = []
    for completion in completions:
        words = completion_text(completion).split()
        grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        rewards.append(-(1.0 - len(set(grams)) / len(grams)) if grams else 0.0)
    return rewards


def think_format(completions: Sequence[Any], **_: Any) -> list[float]:
    """1.0 when the completion is `<think>...</think>` followed by an answer, else 0.0."""
    pattern = re.compile(r"^\s*<think>.*?</think>\s*\S", re.DOTALL)
    return [1.0 if pattern.match(completion_text(c)) else 0.0 for c in completions]


def length_reward(target_chars: int) -> RewardFunction:
    """A reward that is 0.0 at `target_chars` characters and falls linearly to -1.0 (and below)."""

    def length(completions: Sequence[Any], **_: Any) -> list[float]:
        return [-abs(len(completion_text(c)) - target_chars) / max(target_chars, 1) for c in completions]

    return length


REWARD_FUNCTIONS: dict[str, str] = {
    "answer_match": "1 when the completion contains the row's `answer` field",
    "repetition_penalty": "minus the share of repeated word trigrams",
    "think_format": "1 when the completion is <think>...</think> then an answer",
    "length": "0 at half of max_completion_length (in characters x 4), less further away",
}
"""Names a job may use, with what each rewards."""

REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {"answer_match": (ANSWER_FIELD,)}
"""Row fields a reward function reads (checked on every row before training)."""


def reward_function(name: str, *, max_completion_length: int) -> RewardFunction:
    """The reward function called `name` (one of `REWARD_FUNCTIONS`)."""
    functions: dict[str, RewardFunction] = {
        "answer_match": answer_match,
        "repetition_penalty": repetition_penalty,
        "think_format": think_format,
        # About 4 characters per token: half the completion budget.
        "length": length_reward(max(1, max_completion_length * 2)),
    }
    function = functions[name]
    function.__name__ = name  # TRL logs rewards/{name}/mean
    return function


def required_fields(names: Sequence[str]) -> tuple[str, ...]:
    """The row fields the reward functions `names` read."""
    fields: list[str] = []
    for name in names:
        fields.extend(f for f in REQUIRED_FIELDS.get(name, ()) if f not in fields)
    return tuple(fields)
