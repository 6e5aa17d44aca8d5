"""Task metrics of a job's evaluation, chosen by the job's task, and the names progress reports them by.

Every supervised job with an eval split reports `eval_loss` and perplexity
(transformers' evaluation). On top of that, by `TrainingJob.task`:

- SUMMARIZATION: the trained model generates an answer (greedy) for the eval
  rows' prompts, scored against the references with ROUGE-1/2/L F-measures
  (`rouge-score`, Google's implementation, with stemming): `rouge1`, `rouge2`,
  `rougeL`.
- QUESTION_ANSWERING: the same generation, scored with SQuAD's exact match and
  token F1 (answers lower-cased, punctuation and articles removed): `exact_match`,
  `f1`.

Preference methods report TRL's own evaluation: `accuracy` (the share of pairs
whose chosen answer scores above the rejected one: DPO, ORPO, reward models)
and `margin`; GRPO reports the mean `reward` of its sampled completions.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

from trainer_service.datasets import DatasetFormat, prompt_and_reference

SUMMARIZATION = "SUMMARIZATION"
QUESTION_ANSWERING = "QUESTION_ANSWERING"
TASKS = (SUMMARIZATION, QUESTION_ANSWERING)
MAX_GENERATED_ROWS = 64
"""Eval rows the task metrics generate answers for (the first ones of the seeded split)."""
MAX_NEW_TOKENS = 128

EVAL_METRIC_NAMES = {
    # TRL's evaluation logs -> the names progress and the registered model report.
    "eval_rewards/accuracies": "accuracy",  # DPO, ORPO
    "eval_accuracy": "accuracy",  # reward modelling
    "eval_rewards/margins": "margin",
    "eval_margin": "margin",
    "eval_reward": "reward",  # GRPO
    "eval_rouge1": "rouge1",
    "eval_rouge2": "rouge2",
    "eval_rougeL": "rougeL",
    "eval_exact_match": "exact_match",
    "eval_f1": "f1",
}


def eval_metrics_of(logs: dict[str, Any]) -> dict[str, float]:
    """The task metrics in a log entry, by their reported names (finite numbers only)."""
    found: dict[str, float] = {}
    for key, name in EVAL_METRIC_NAMES.items():
        value = logs.get(key)
        if isinstance(value, int | float) and value == value and abs(value) != float("inf"):
            found[name] = float(value)
    return found


# --------------------------------------------------------------------------- scores


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge-score, stemmed)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for name in totals:
            totals[name] += scores[name].fmeasure
    count = max(len(predictions), 1)
    return {name: total / count for name, total in totals.items()}


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 of two answers."""
    predicted = normalize_answer(prediction).split()
    expected = normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match and token F1 (SQuAD's definitions)."""
    count = max(len(predictions), 1)
    exact = sum(
        normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)
    )
    f1 = sum(token_f1(p, r) for p, r in zip(predictions, references, strict=True))
    return {"exact_match": exact / count, "f1": f1 / count}


def score(task: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The task's metrics of generated answers against references."""
    if task == SUMMARIZATION:
        return rouge(predictions, references)
    if task == QUESTION_ANSWERING:
        return squad(predictions, references)
    return {}


# --------------------------------------------------------------------------- generation


def generate_answers(
    model: Any, tokenizer: Any, prompts: Sequence[Any], references: Sequence[str]
) -> list[str]:
    """Greedy answers of `model` to `prompts` (strings or messages), each about as long as its reference."""
    import torch

    answers = []
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        for prompt, reference in zip(prompts, references, strict=True):
            if isinstance(prompt, list):
                ids = tokenizer.apply_chat_template(
                    prompt, tokenize=True, add_generation_prompt=True, return_dict=True
                )["input_ids"]
            else:
                ids = tokenizer(prompt)["input_ids"]
            budget = min(MAX_NEW_TOKENS, len(tokenizer(reference)["input_ids"]) + 8)
            inputs = torch.tensor([list(ids)], device=model.device)
            with torch.no_grad():
                output = model.generate(
                    input_ids=inputs,
                    attention_mask=torch.ones_like(inputs),
                    max_new_tokens=budget,
                    do_sample=False,
                    pad_token_id=pad,
                )
            answers.append(str(tokenizer.decode(output[0][inputs.shape[1] :], skip_special_tokens=True)))
    finally:
        if was_training:
            model.train()
    return answers


def task_metrics(
    task: str, model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], fmt: DatasetFormat
) -> dict[str, float]:
    """The task's metrics (`eval_`-prefixed) of `model` on up to `MAX_GENERATED_ROWS` eval rows."""
    if task not in TASKS:
        return {}
    pairs = [pair for pair in (prompt_and_reference(row, fmt) for row in rows) if pair is not None]
    pairs = pairs[:MAX_GENERATED_ROWS]
    if not pairs:
        return {}
    prompts = [prompt for prompt, _ in pairs]
    references = [reference for _, reference in pairs]
    predictions = generate_answers(model, tokenizer, prompts, references)
    metrics = {f"eval_{name}": value for name, value in score(task, predictions, references).items()}
    metrics["eval_generated_rows"] = float(len(pairs))
    return metrics
