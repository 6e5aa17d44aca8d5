"""Training data: load, detect the format, check every row, tokenize.

A dataset is a local JSONL / JSON / Parquet file, a folder of such files (or a
folder written by `datasets.Dataset.save_to_disk`), or the name of a
Hugging Face `datasets` dataset already in the local datasets cache (never
downloaded; loading is `trainer_service.dataset_files`). Rows are plain dicts in one of these formats:

- text: `{"text": "..."}`
- prompt/completion: `{"prompt": "...", "completion": "..."}` (strings, or
  lists of chat messages: conversational prompt/completion)
- chat: `{"messages": [{"role": "user", "content": "..."}, ...]}`
- preference: `{"prompt": ..., "chosen": ..., "rejected": ...}` (strings, or
  lists of chat messages)
- Alpaca: `{"instruction": "...", "input": "...", "output": "..."}` (`input`
  optional), trained as prompt/completion (`alpaca_prompt`)
- ShareGPT: `{"conversations": [{"from": "human", "value": "..."}, ...]}`,
  trained as chat (`from`: system, human/user, gpt/assistant, tool/function)
- unpaired preference (KTO): `{"prompt": ..., "completion": ..., "label": true}`
- prompt only (GRPO): `{"prompt": ...}`; other fields (e.g. `answer`) are
  passed to the reward functions

`check_rows` reports every problem by row (`RowIssue`) before any compute is
spent: a row that is not an object, a missing field, a wrong type, an empty
value, a conversation without an assistant turn, a row longer than
`max_seq_length` tokens once rendered with the base model's tokenizer and chat
template. Tokenization here is the one the training uses (`tokenize_sft_row`),
so "too long" means the same thing in validation and in training.

Chat rows are rendered with the model's chat template and trained on the
assistant turns only: each assistant turn's tokens are found by rendering the
conversation up to that turn (with and without the turn) and comparing token
prefixes, which works for any template that renders a conversation's prefix
the same way (ChatML, Llama 3, Qwen, ...).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from server_kit.errors import FailedPrecondition, FieldViolation, InvalidArgument
from trainer_service.dataset_files import DATA_SUFFIXES as DATA_SUFFIXES
from trainer_service.dataset_files import LoadedRows as LoadedRows
from trainer_service.dataset_files import Unparsable, load_rows

MAX_REPORTED_ISSUES = 100
DEFAULT_MAX_SEQ_LENGTH = 512
DEFAULT_EVAL_SPLIT = 0.1
MAX_EVAL_ROWS = 1000
"""The eval split is capped: a big dataset holds out at most this many rows."""
IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant", "tool")


class DatasetFormat(StrEnum):
    """Row format of a dataset (the proto's `DatasetFormat` without the prefix)."""

    TEXT = "TEXT"
    PROMPT_COMPLETION = "PROMPT_COMPLETION"
    CHAT = "CHAT"
    PREFERENCE = "PREFERENCE"
    ALPACA = "ALPACA"
    SHAREGPT = "SHAREGPT"
    UNPAIRED_PREFERENCE = "UNPAIRED_PREFERENCE"
    PROMPT_ONLY = "PROMPT_ONLY"


class Method(StrEnum):
    """Training method (the proto's `TrainingMethod` without the prefix)."""

    LORA = "LORA"
    QLORA = "QLORA"
    FULL = "FULL"
    DPO = "DPO"
    ORPO = "ORPO"
    KTO = "KTO"
    REWARD = "REWARD"
    GRPO = "GRPO"


SFT_FORMATS = (
    DatasetFormat.TEXT,
    DatasetFormat.PROMPT_COMPLETION,
    DatasetFormat.CHAT,
    DatasetFormat.ALPACA,
    DatasetFormat.SHAREGPT,
)
PREFERENCE_METHODS = (Method.DPO, Method.ORPO, Method.KTO, Method.REWARD)
"""Methods trained on preferences: their evaluation reports a preference accuracy."""

METHOD_FORMATS: dict[Method, tuple[DatasetFormat, ...]] = {
    Method.LORA: SFT_FORMATS,
    Method.QLORA: SFT_FORMATS,
    Method.FULL: SFT_FORMATS,
    Method.DPO: (DatasetFormat.PREFERENCE,),
    Method.ORPO: (DatasetFormat.PREFERENCE,),
    Method.KTO: (DatasetFormat.UNPAIRED_PREFERENCE, DatasetFormat.PREFERENCE),
    Method.REWARD: (DatasetFormat.PREFERENCE,),
    Method.GRPO: (DatasetFormat.PROMPT_ONLY,),
}

REQUIRED_FIELDS: dict[DatasetFormat, tuple[str, ...]] = {
    DatasetFormat.TEXT: ("text",),
    DatasetFormat.PROMPT_COMPLETION: ("prompt", "completion"),
    DatasetFormat.CHAT: ("messages",),
    DatasetFormat.PREFERENCE: ("prompt", "chosen", "rejected"),
    DatasetFormat.ALPACA: ("instruction", "output"),
    DatasetFormat.SHAREGPT: ("conversations",),
    DatasetFormat.UNPAIRED_PREFERENCE: ("prompt", "completion", "label"),
    DatasetFormat.PROMPT_ONLY: ("prompt",),
}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
"""ShareGPT `from` values and the chat role each becomes."""


@dataclass(frozen=True)
class RowIssue:
    """A problem in one row: `field` is relative to the row, e.g. `messages[1].content`."""

    row: int
    field: str
    message: str

    @property
    def path(self) -> str:
        """The request path of the problem, e.g. `dataset.rows[3].messages[1].content`."""
        return f"dataset.rows[{self.row}]" + (f".{self.field}" if self.field else "")

    def violation(self) -> FieldViolation:
        """This issue as a field violation of a request."""
        return FieldViolation(self.path, self.message)


@dataclass
class DatasetReport:
    """What checking a dataset found."""

    format: DatasetFormat
    num_rows: int
    issues: list[RowIssue] = field(default_factory=list)
    total_issues: int = 0
    max_tokens: int | None = None

    @property
    def valid(self) -> bool:
        """True when no row has an issue."""
        return self.total_issues == 0

    def raise_if_invalid(self) -> None:
        """InvalidArgument (reason INVALID_DATASET) with one violation per reported issue."""
        if self.valid:
            return
        rows = sorted({issue.row for issue in self.issues})
        more = self.total_issues - len(self.issues)
        first = self.issues[0]
        message = (
            f"the dataset has {self.total_issues} problem(s) in {len(rows)}+ row(s); "
            f"first: row {first.row} {first.field or ''}: {first.message}".replace("  ", " ")
        )
        if more > 0:
            message += f" ({more} more not listed)"
        raise InvalidArgument(
            message,
            reason="INVALID_DATASET",
            metadata={"issues": self.total_issues, "rows": ",".join(str(r) for r in rows[:20])},
            violations=[issue.violation() for issue in self.issues],
        )


class _IssueList:
    """Collects issues, keeping the first `limit` and counting the rest."""

    def __init__(self, limit: int = MAX_REPORTED_ISSUES) -> None:
        self.limit = limit
        self.kept: list[RowIssue] = []
        self.total = 0
        self.rows: set[int] = set()

    def add(self, row: int, field_name: str, message: str) -> None:
        self.total += 1
        self.rows.add(row)
        if len(self.kept) < self.limit:
            self.kept.append(RowIssue(row, field_name, message))


# --------------------------------------------------------------------------- format


def detect_format(rows: Iterable[Any]) -> DatasetFormat:
    """The format of the first row that is an object with known fields."""
    for row in rows:
        if not isinstance(row, dict):
            continue
        keys = set(row)
        if "messages" in keys:
            return DatasetFormat.CHAT
        if "conversations" in keys:
            return DatasetFormat.SHAREGPT
        if "instruction" in keys and "output" in keys:
            return DatasetFormat.ALPACA
        if "chosen" in keys and "rejected" in keys:
            return DatasetFormat.PREFERENCE
        if "prompt" in keys and "completion" in keys:
            return DatasetFormat.UNPAIRED_PREFERENCE if "label" in keys else DatasetFormat.PROMPT_COMPLETION
        if "text" in keys:
            return DatasetFormat.TEXT
        if "prompt" in keys:
            return DatasetFormat.PROMPT_ONLY
    raise InvalidArgument(
        "cannot detect the dataset format: rows need `text`, `prompt`+`completion`, `messages`, "
        "`prompt`+`chosen`+`rejected`, `instruction`+`output` (Alpaca), `conversations` (ShareGPT), "
        "`prompt`+`completion`+`label` (unpaired preference) or only `prompt`",
        reason="UNKNOWN_DATASET_FORMAT",
        violations=[FieldViolation("dataset.format", "not detectable from the rows; set it")],
    )


def check_method_format(method: Method, fmt: DatasetFormat) -> None:
    """InvalidArgument when `method` cannot train on `fmt` rows."""
    allowed = METHOD_FORMATS[method]
    if fmt not in allowed:
        needs = " or ".join(f"{f.value.lower()} ({', '.join(REQUIRED_FIELDS[f])})" for f in allowed)
        raise InvalidArgument(
            f"method {method.value} needs {needs} rows; the dataset is {fmt.value.lower()}",
            reason="DATASET_FORMAT_MISMATCH",
            metadata={"method": method.value, "format": fmt.value},
            violations=[FieldViolation("dataset.format", f"{fmt.value} does not fit method {method.value}")],
        )


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and (not value or isinstance(value[0], dict))


def _check_text(issues: _IssueList, row: int, name: str, value: Any) -> bool:
    if not isinstance(value, str):
        issues.add(row, name, f"must be a string, not {_type_name(value)}")
        return False
    if not value.strip():
        issues.add(row, name, "is empty")
        return False
    return True


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def _check_messages(
    issues: _IssueList, row: int, name: str, value: Any, *, need_assistant: bool, only_assistant: bool = False
) -> bool:
    if not isinstance(value, list):
        issues.add(row, name, f"must be a list of messages, not {_type_name(value)}")
        return False
    if not value:
        issues.add(row, name, "is empty")
        return False
    ok = True
    for index, message in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(message, dict):
            issues.add(row, where, f"must be an object with role and content, not {_type_name(message)}")
            ok = False
            continue
        role = message.get("role")
        if role not in CHAT_ROLES:
            issues.add(row, f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}, not {role!r}")
            ok = False
        elif only_assistant and role != "assistant":
            issues.add(row, f"{where}.role", f"must be assistant here, not {role!r}")
            ok = False
        content = message.get("content")
        if "content" not in message:
            issues.add(row, f"{where}.content", "is missing")
            ok = False
        elif not isinstance(content, str):
            issues.add(row, f"{where}.content", f"must be a string, not {_type_name(content)}")
            ok = False
        elif not content.strip() and role == "assistant":
            issues.add(row, f"{where}.content", "is empty")
            ok = False
    if ok and need_assistant and not any(m.get("role") == "assistant" for m in value):
        issues.add(row, name, "has no assistant message to train on")
        ok = False
    return ok


def _check_structure(issues: _IssueList, row: int, value: Any, fmt: DatasetFormat) -> bool:
    """Field presence and types of one row; True when it can be tokenized."""
    if isinstance(value, Unparsable):
        issues.add(row, "", value.error)
        return False
    if not isinstance(value, dict):
        issues.add(row, "", f"must be an object, not {_type_name(value)}")
        return False
    missing = [name for name in REQUIRED_FIELDS[fmt] if name not in value or value[name] is None]
    for name in missing:
        issues.add(
            row, name, f"is missing (a {fmt.value.lower()} row needs {', '.join(REQUIRED_FIELDS[fmt])})"
        )
    if missing:
        return False
    if fmt == DatasetFormat.TEXT:
        return _check_text(issues, row, "text", value["text"])
    if fmt in _EXTRA_CHECKS:
        return _EXTRA_CHECKS[fmt](issues, row, value)
    if fmt == DatasetFormat.CHAT:
        return _check_messages(issues, row, "messages", value["messages"], need_assistant=True)
    if fmt == DatasetFormat.PROMPT_COMPLETION:
        if _is_messages(value["prompt"]) or _is_messages(value["completion"]):
            ok = _check_messages(issues, row, "prompt", value["prompt"], need_assistant=False)
            return (
                _check_messages(
                    issues, row, "completion", value["completion"], need_assistant=True, only_assistant=True
                )
                and ok
            )
        ok = _check_text(issues, row, "prompt", value["prompt"])
        return _check_text(issues, row, "completion", value["completion"]) and ok
    # Preference pairs.
    if _is_messages(value["prompt"]) or _is_messages(value["chosen"]):
        ok = _check_messages(issues, row, "prompt", value["prompt"], need_assistant=False)
        for name in ("chosen", "rejected"):
            ok = (
                _check_messages(issues, row, name, value[name], need_assistant=True, only_assistant=True)
                and ok
            )
        return ok
    ok = _check_text(issues, row, "prompt", value["prompt"])
    for name in ("chosen", "rejected"):
        ok = _check_text(issues, row, name, value[name]) and ok
    if ok and value["chosen"] == value["rejected"]:
        issues.add(row, "rejected", "is the same as chosen; a preference pair needs two different answers")
        ok = False
    return ok


def _check_alpaca(issues: _IssueList, row: int, value: dict[str, Any]) -> bool:
    ok = _check_text(issues, row, "instruction", value["instruction"])
    ok = _check_text(issues, row, "output", value["output"]) and ok
    extra = value.get("input")
    if extra is not None and not isinstance(extra, str):
        issues.add(row, "input", f"must be a string, not {_type_name(extra)}")
        ok = False
    return ok


def _check_sharegpt(issues: _IssueList, row: int, value: dict[str, Any]) -> bool:
    turns = value["conversations"]
    if not isinstance(turns, list):
        issues.add(row, "conversations", f"must be a list of turns, not {_type_name(turns)}")
        return False
    if not turns:
        issues.add(row, "conversations", "is empty")
        return False
    ok = True
    for index, turn in enumerate(turns):
        where = f"conversations[{index}]"
        if not isinstance(turn, dict):
            issues.add(row, where, f"must be an object with from and value, not {_type_name(turn)}")
            ok = False
            continue
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            issues.add(row, f"{where}.from", f"must be one of {', '.join(SHAREGPT_ROLES)}, not {speaker!r}")
            ok = False
        text = turn.get("value")
        if "value" not in turn:
            issues.add(row, f"{where}.value", "is missing")
            ok = False
        elif not isinstance(text, str):
            issues.add(row, f"{where}.value", f"must be a string, not {_type_name(text)}")
            ok = False
        elif not text.strip() and SHAREGPT_ROLES.get(str(speaker)) == "assistant":
            issues.add(row, f"{where}.value", "is empty")
            ok = False
    if ok and not any(SHAREGPT_ROLES[t["from"]] == "assistant" for t in turns):
        issues.add(row, "conversations", "has no gpt (assistant) turn to train on")
        ok = False
    return ok


def _check_unpaired(issues: _IssueList, row: int, value: dict[str, Any]) -> bool:
    if _is_messages(value["prompt"]) or _is_messages(value["completion"]):
        ok = _check_messages(issues, row, "prompt", value["prompt"], need_assistant=False)
        ok = (
            _check_messages(
                issues, row, "completion", value["completion"], need_assistant=True, only_assistant=True
            )
            and ok
        )
    else:
        ok = _check_text(issues, row, "prompt", value["prompt"])
        ok = _check_text(issues, row, "completion", value["completion"]) and ok
    if not isinstance(value["label"], bool):
        issues.add(row, "label", f"must be true (desirable) or false (undesirable), not {value['label']!r}")
        ok = False
    return ok


def _check_prompt_only(issues: _IssueList, row: int, value: dict[str, Any]) -> bool:
    prompt = value["prompt"]
    if _is_messages(prompt):
        if not _check_messages(issues, row, "prompt", prompt, need_assistant=False):
            return False
        if prompt[-1].get("role") == "assistant":
            issues.add(
                row, f"prompt[{len(prompt) - 1}].role", "the last prompt message must not be assistant"
            )
            return False
        return True
    return _check_text(issues, row, "prompt", prompt)


_EXTRA_CHECKS = {
    DatasetFormat.ALPACA: _check_alpaca,
    DatasetFormat.SHAREGPT: _check_sharegpt,
    DatasetFormat.UNPAIRED_PREFERENCE: _check_unpaired,
    DatasetFormat.PROMPT_ONLY: _check_prompt_only,
}


def alpaca_prompt(row: dict[str, Any]) -> str:
    """The prompt of an Alpaca row (the Alpaca template's sections; the output is the completion)."""
    extra = row.get("input") or ""
    prompt = f"### Instruction:\n{row['instruction']}\n\n"
    if extra.strip():
        prompt += f"### Input:\n{extra}\n\n"
    return prompt + "### Response:\n"


def standard_row(row: dict[str, Any], fmt: DatasetFormat) -> tuple[dict[str, Any], DatasetFormat]:
    """An Alpaca row as prompt/completion, a ShareGPT row as chat; other rows as they are."""
    if fmt == DatasetFormat.ALPACA:
        return {"prompt": alpaca_prompt(row), "completion": row["output"]}, DatasetFormat.PROMPT_COMPLETION
    if fmt == DatasetFormat.SHAREGPT:
        messages = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]
        return {"messages": messages}, DatasetFormat.CHAT
    return row, fmt


def prompt_and_reference(row: dict[str, Any], fmt: DatasetFormat) -> tuple[Any, str] | None:
    """The prompt (a string or messages) and the reference answer of a supervised row; None for text."""
    row, fmt = standard_row(row, fmt)
    if fmt == DatasetFormat.PROMPT_COMPLETION:
        if _is_messages(row["prompt"]) or _is_messages(row["completion"]):
            answer = " ".join(m["content"] for m in row["completion"])
            return _plain_messages(row["prompt"]), answer
        return row["prompt"], row["completion"]
    if fmt == DatasetFormat.CHAT:
        messages = _plain_messages(row["messages"])
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last], messages[last]["content"]
    return None


# --------------------------------------------------------------------------- tokenization


@dataclass
class TokenizedRow:
    """Token ids of one supervised row; `labels` is -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _chat_ids(
    tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False
) -> list[int]:
    if not messages:
        return []
    output = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(output["input_ids"])


def _text_ids(tokenizer: Any, text: str, *, eos: bool) -> list[int]:
    ids = list(tokenizer(text)["input_ids"])
    if eos and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids


def _plain_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def tokenize_sft_row(row: dict[str, Any], fmt: DatasetFormat, tokenizer: Any) -> TokenizedRow:
    """Tokens and labels of a supervised row (text, prompt/completion or chat).

    Text rows train on every token (an EOS is appended); prompt/completion rows
    on the completion (plus EOS); chat rows on the assistant turns. Alpaca rows
    are prompt/completion rows, ShareGPT rows chat rows (`standard_row`).
    """
    row, fmt = standard_row(row, fmt)
    if fmt == DatasetFormat.TEXT:
        ids = _text_ids(tokenizer, row["text"], eos=True)
        return TokenizedRow(ids, list(ids))
    if fmt == DatasetFormat.PROMPT_COMPLETION:
        if _is_messages(row["prompt"]) or _is_messages(row["completion"]):
            prompt = _plain_messages(row["prompt"])
            prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
            ids = _chat_ids(tokenizer, prompt + _plain_messages(row["completion"]))
        else:
            prompt_ids = list(tokenizer(row["prompt"])["input_ids"])
            ids = _text_ids(tokenizer, row["prompt"] + row["completion"], eos=True)
        start = common_prefix_length(prompt_ids, ids)
        return TokenizedRow(ids, [IGNORE_INDEX] * start + ids[start:])
    if fmt == DatasetFormat.CHAT:
        messages = _plain_messages(row["messages"])
        ids = _chat_ids(tokenizer, messages)
        labels = [IGNORE_INDEX] * len(ids)
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = _chat_ids(tokenizer, messages[:index], add_generation_prompt=True)
            through = _chat_ids(tokenizer, messages[: index + 1])
            start = common_prefix_length(before, ids)
            end = common_prefix_length(through, ids)
            labels[start:end] = ids[start:end]
        return TokenizedRow(ids, labels)
    raise ValueError(f"{fmt} rows are not supervised rows")


def preference_lengths(row: dict[str, Any], tokenizer: Any) -> tuple[int, int]:
    """Token lengths of prompt+chosen and prompt+rejected of a preference row."""
    if _is_messages(row["prompt"]) or _is_messages(row["chosen"]):
        prompt = _plain_messages(row["prompt"])
        return (
            len(_chat_ids(tokenizer, prompt + _plain_messages(row["chosen"]))),
            len(_chat_ids(tokenizer, prompt + _plain_messages(row["rejected"]))),
        )
    # TRL joins prompt and answer with no separator and appends EOS.
    return (
        len(_text_ids(tokenizer, row["prompt"] + row["chosen"], eos=True)),
        len(_text_ids(tokenizer, row["prompt"] + row["rejected"], eos=True)),
    )


def prompt_lengths(row: dict[str, Any], fmt: DatasetFormat, tokenizer: Any) -> dict[str, int]:
    """Token lengths of an unpaired preference row (prompt + completion) or a prompt-only row."""
    prompt = row["prompt"]
    if fmt == DatasetFormat.PROMPT_ONLY:
        if _is_messages(prompt):
            return {"prompt": len(_chat_ids(tokenizer, _plain_messages(prompt), add_generation_prompt=True))}
        return {"prompt": len(tokenizer(prompt)["input_ids"])}
    if _is_messages(prompt) or _is_messages(row["completion"]):
        ids = _chat_ids(tokenizer, _plain_messages(prompt) + _plain_messages(row["completion"]))
        return {"completion": len(ids)}
    return {"completion": len(_text_ids(tokenizer, prompt + row["completion"], eos=True))}


def needs_chat_template(rows: Sequence[Any], fmt: DatasetFormat) -> bool:
    """Whether rendering the rows needs the model's chat template."""
    if fmt in (DatasetFormat.CHAT, DatasetFormat.SHAREGPT):
        return True
    if fmt in (
        DatasetFormat.PROMPT_COMPLETION,
        DatasetFormat.PREFERENCE,
        DatasetFormat.UNPAIRED_PREFERENCE,
        DatasetFormat.PROMPT_ONLY,
    ):
        for row in rows:
            if isinstance(row, dict):
                return _is_messages(row.get("prompt")) or _is_messages(
                    row.get("completion", row.get("chosen"))
                )
    return False


# --------------------------------------------------------------------------- checking


def check_rows(
    rows: Sequence[Any],
    fmt: DatasetFormat,
    *,
    tokenizer: Any = None,
    max_seq_length: int | None = None,
    limit: int = MAX_REPORTED_ISSUES,
    extra_fields: Sequence[str] = (),
) -> DatasetReport:
    """Check every row of `rows` as `fmt` rows; lengths too when a tokenizer is given.

    `extra_fields` are string fields every row must also have (e.g. the
    `answer` a GRPO reward function compares completions with).
    """
    issues = _IssueList(limit)
    max_tokens: int | None = None
    if not rows:
        raise InvalidArgument(
            "the dataset has no rows",
            reason="EMPTY_DATASET",
            violations=[FieldViolation("dataset.source", "no rows")],
        )
    if (
        tokenizer is not None
        and needs_chat_template(rows, fmt)
        and not getattr(tokenizer, "chat_template", None)
    ):
        raise FailedPrecondition(
            "the base model has no chat template, so chat rows cannot be rendered; "
            "use text or prompt/completion rows, or a model with a chat template",
            reason="NO_CHAT_TEMPLATE",
        )
    for index, row in enumerate(rows):
        if not _check_structure(issues, index, row, fmt):
            continue
        missing_extra = False
        for name in extra_fields:
            if name not in row or row[name] is None:
                issues.add(index, name, "is missing (the reward functions of the job read it)")
                missing_extra = True
            elif not _check_text(issues, index, name, row[name]):
                missing_extra = True
        if missing_extra or tokenizer is None:
            continue
        try:
            if fmt == DatasetFormat.PREFERENCE:
                chosen, rejected = preference_lengths(row, tokenizer)
                lengths = {"chosen": chosen, "rejected": rejected}
            elif fmt in (DatasetFormat.UNPAIRED_PREFERENCE, DatasetFormat.PROMPT_ONLY):
                lengths = prompt_lengths(row, fmt, tokenizer)
            else:
                tokenized = tokenize_sft_row(row, fmt, tokenizer)
                main = {
                    DatasetFormat.TEXT: "text",
                    DatasetFormat.CHAT: "messages",
                    DatasetFormat.SHAREGPT: "conversations",
                    DatasetFormat.ALPACA: "output",
                }.get(fmt, "completion")
                lengths = {main: len(tokenized.input_ids)}
                if all(label == IGNORE_INDEX for label in tokenized.labels):
                    issues.add(index, main, "has no tokens to train on after rendering")
                    continue
        except Exception as error:  # a template that raises on this row
            issues.add(index, "", f"cannot be rendered with the model's tokenizer: {error}")
            continue
        for name, length in lengths.items():
            max_tokens = length if max_tokens is None else max(max_tokens, length)
            if max_seq_length is not None and length > max_seq_length:
                issues.add(
                    index,
                    name,
                    f"is {length} tokens long, over max_seq_length {max_seq_length}; "
                    "shorten the row or raise max_seq_length",
                )
    return DatasetReport(fmt, len(rows), issues.kept, issues.total, max_tokens)


@dataclass
class ValidatedDataset:
    """A dataset that was loaded and checked: its rows, format and report."""

    rows: list[Any]
    format: DatasetFormat
    report: DatasetReport
    origin: str


def validate_dataset(
    source: str,
    method: Method,
    *,
    fmt: DatasetFormat | None = None,
    split: str = "",
    tokenizer: Any = None,
    max_seq_length: int | None = DEFAULT_MAX_SEQ_LENGTH,
    roots: Sequence[Path] = (),
    datasets_cache: Path | None = None,
    extra_fields: Sequence[str] = (),
) -> ValidatedDataset:
    """Load `source`, detect (or take) its format, check it fits `method`, check every row.

    Dataset-level problems (not found, unknown format, wrong format for the
    method, no chat template) raise; row problems are in the report.
    """
    loaded = load_rows(source, split=split, roots=roots, datasets_cache=datasets_cache)
    if not loaded.rows:
        raise InvalidArgument(
            f"dataset {source!r} has no rows",
            reason="EMPTY_DATASET",
            violations=[FieldViolation("dataset.source", "no rows")],
        )
    detected = fmt or detect_format(loaded.rows)
    check_method_format(method, detected)
    report = check_rows(
        loaded.rows, detected, tokenizer=tokenizer, max_seq_length=max_seq_length, extra_fields=extra_fields
    )
    return ValidatedDataset(loaded.rows, detected, report, loaded.origin)


def eval_row_count(num_rows: int, eval_fraction: float) -> int:
    """Rows held out of `num_rows` for `eval_fraction`: at least one, at most `MAX_EVAL_ROWS`, never all."""
    if eval_fraction <= 0 or num_rows < 2:
        return 0
    return min(num_rows - 1, MAX_EVAL_ROWS, max(1, math.floor(num_rows * eval_fraction)))


def split_rows(rows: Sequence[Any], eval_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out `eval_fraction` of the rows (`eval_row_count`, a seeded random choice) for evaluation."""
    import random

    count = eval_row_count(len(rows), eval_fraction)
    if count == 0:
        return list(rows), []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    train = [row for i, row in enumerate(rows) if i not in held]
    evaluation = [row for i, row in enumerate(rows) if i in held]
    return train, evaluation
