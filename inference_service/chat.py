"""Chat prompts: messages rendered with the model's own chat template.

The template is the one the model ships (``tokenizer_config.json`` or
``chat_template.jinja``, which the catalog records), or a template string given with the
request.  Rendering uses transformers' ``apply_chat_template`` (a sandboxed jinja2
environment with ``raise_exception``, ``strftime_now`` and the ``{% generation %}``
extension) with ``add_generation_prompt=True``, so the prompt ends where the assistant's
answer begins.  The rendered text already holds the template's special tokens: encode it
with ``add_special_tokens=False``.

A template is code the request (or the model's files) supplies, so rendering runs under a
budget (`RenderBudget`): at most ``max_chars`` characters of output and ``seconds`` of
wall time, checked between the template's output pieces and on every line the compiled
template executes.  Past either, InvalidArgument ``CHAT_TEMPLATE_BUDGET_EXCEEDED``.  The
server renders on a worker thread (`render_and_encode`) so the event loop keeps answering
while a template runs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from server_kit.errors import FailedPrecondition, FieldViolation, InvalidArgument

if TYPE_CHECKING:
    from inference_service.engines.base import Tokenizer

DEFAULT_MAX_RENDERED_CHARS = 8 * 1024 * 1024
"""Most characters a rendered chat prompt may have when no context length bounds it."""

CHARS_PER_CONTEXT_TOKEN = 64
"""Characters allowed per token of the model's context: no prompt longer fits it anyway."""

MIN_RENDERED_CHARS = 64 * 1024
"""Least rendered size allowed, however short the context."""

DEFAULT_RENDER_SECONDS = 2.0
"""Wall time a chat template may take to render."""


@dataclass(frozen=True)
class RenderBudget:
    """Bounds on rendering one chat template."""

    max_chars: int = DEFAULT_MAX_RENDERED_CHARS
    seconds: float = DEFAULT_RENDER_SECONDS

    @classmethod
    def for_context(cls, max_model_len: int, seconds: float = DEFAULT_RENDER_SECONDS) -> RenderBudget:
        """The budget for a model with ``max_model_len`` tokens of context."""
        chars = max(MIN_RENDERED_CHARS, max_model_len * CHARS_PER_CONTEXT_TOKEN)
        return cls(max_chars=min(chars, DEFAULT_MAX_RENDERED_CHARS), seconds=seconds)


class _OverBudget(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _budget_error(budget: RenderBudget, what: str) -> InvalidArgument:
    if what == "size":
        detail = f"its output exceeded {budget.max_chars} characters"
    else:
        detail = f"it ran longer than {budget.seconds:g} s"
    return InvalidArgument(
        f"the chat template was stopped: {detail}; templates must render a prompt that fits "
        "the model's context, quickly",
        reason="CHAT_TEMPLATE_BUDGET_EXCEEDED",
        violations=[FieldViolation("chat_template", detail)],
        metadata={"limit": what, "max_chars": str(budget.max_chars), "seconds": f"{budget.seconds:g}"},
    )


def _render_bounded(compiled: Any, budget: RenderBudget, variables: dict[str, Any]) -> str:
    """``compiled.generate(**variables)`` joined, stopped past ``budget``.

    A line tracer on the template's own frames (compiled jinja code, file ``<template>``)
    checks the deadline, so loops that print nothing are stopped too; other frames are
    not traced.  The thread's previous tracer (a coverage tool, a debugger) is restored.
    """
    deadline = time.monotonic() + budget.seconds

    def on_line(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _OverBudget("time")
        return on_line

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename == "<template>":
            return on_line(frame, event, arg)
        return None

    pieces: list[str] = []
    size = 0
    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        for piece in compiled.generate(**variables):
            size += len(piece)
            if size > budget.max_chars:
                raise _OverBudget("size")
            if time.monotonic() > deadline:
                raise _OverBudget("time")
            pieces.append(piece)
    finally:
        sys.settrace(previous)
    return "".join(pieces)


CHAT_ROLES: frozenset[str] = frozenset({"system", "user", "assistant", "tool"})
"""Roles a chat message may have."""


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation."""

    role: str
    content: str


def _as_dict(message: ChatMessage | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(message, ChatMessage):
        return {"role": message.role, "content": message.content}
    return dict(message)


def validate_messages(
    messages: Sequence[ChatMessage | Mapping[str, Any]], *, field: str = "messages"
) -> list[dict[str, Any]]:
    """The messages as dicts; InvalidArgument with field violations when they are unusable."""
    conversation = [_as_dict(m) for m in messages]
    if not conversation:
        raise InvalidArgument(
            "a chat needs at least one message",
            reason="EMPTY_CONVERSATION",
            violations=[FieldViolation(field, "must contain at least one message")],
        )
    violations = []
    for i, message in enumerate(conversation):
        role = message.get("role")
        if role not in CHAT_ROLES:
            violations.append(
                FieldViolation(f"{field}[{i}].role", f"must be one of {sorted(CHAT_ROLES)}, got {role!r}")
            )
        if not isinstance(message.get("content"), str):
            violations.append(FieldViolation(f"{field}[{i}].content", "must be a string"))
    if violations:
        raise InvalidArgument("invalid chat messages", reason="INVALID_CHAT_MESSAGES", violations=violations)
    return conversation


def resolve_template(tokenizer: Tokenizer, template: str | None) -> str:
    """The template to render with: ``template`` when given, else the model's own.

    Raises FailedPrecondition ``NO_CHAT_TEMPLATE`` when the model has none (or several
    without a default) and no template was given.
    """
    if template:
        return template
    own = getattr(tokenizer.hf_tokenizer, "chat_template", None)
    if isinstance(own, dict):  # named templates: use "default"
        own = own.get("default")
    if isinstance(own, str) and own:
        return own
    raise FailedPrecondition(
        "the model has no chat template; pass one in the request's `chat_template` field "
        "or use Generate with a prompt you format yourself",
        reason="NO_CHAT_TEMPLATE",
    )


def render_chat(
    tokenizer: Tokenizer,
    messages: Sequence[ChatMessage | Mapping[str, Any]],
    *,
    template: str | None = None,
    add_generation_prompt: bool = True,
    budget: RenderBudget | None = None,
) -> str:
    """Render ``messages`` into a prompt with the model's chat template (or ``template``),
    within ``budget`` (default `RenderBudget()`).  Blocking: the server renders through
    `render_and_encode` on a worker thread.

    Raises:
        FailedPrecondition: ``NO_CHAT_TEMPLATE`` (no template anywhere).
        InvalidArgument: ``INVALID_CHAT_MESSAGES`` / ``EMPTY_CONVERSATION`` for bad
            messages, ``INVALID_CHAT_TEMPLATE`` for a template that does not parse,
            ``CHAT_TEMPLATE_ERROR`` when the template refuses the conversation (its
            ``raise_exception`` message, e.g. "roles must alternate"),
            ``CHAT_TEMPLATE_BUDGET_EXCEEDED`` past the size or time budget.
    """
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    conversation = validate_messages(messages)
    chosen = resolve_template(tokenizer, template)
    budget = budget or RenderBudget()
    try:
        # What transformers' apply_chat_template(tokenize=False) renders (same compiled
        # environment, same variables), but piece by piece so the budget can stop it.
        compiled = _compile_jinja_template(chosen)
        variables = {
            **tokenizer.hf_tokenizer.special_tokens_map,
            "messages": conversation,
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        rendered = _render_bounded(compiled, budget, variables)
    except _OverBudget as exc:
        raise _budget_error(budget, exc.what) from None
    except jinja2.TemplateSyntaxError as exc:
        field = "chat_template" if template else "model.chat_template"
        raise InvalidArgument(
            f"the chat template does not parse: {exc.message} (line {exc.lineno})",
            reason="INVALID_CHAT_TEMPLATE",
            violations=[FieldViolation(field, f"jinja syntax error: {exc.message}")],
        ) from exc
    except jinja2.TemplateError as exc:
        raise InvalidArgument(
            f"the chat template refused the conversation: {exc}",
            reason="CHAT_TEMPLATE_ERROR",
        ) from exc
    except Exception as exc:
        # The template's own expressions failed (`{{ 1/0 }}`, `{{ 'a' + [] }}`): the
        # template is at fault, not the server.
        raise InvalidArgument(
            f"the chat template failed while rendering: {type(exc).__name__}: {str(exc)[:200]}",
            reason="CHAT_TEMPLATE_ERROR",
        ) from exc
    return str(rendered)


def render_and_encode(
    tokenizer: Tokenizer,
    messages: Sequence[ChatMessage | Mapping[str, Any]],
    *,
    template: str | None = None,
    budget: RenderBudget | None = None,
) -> list[int]:
    """The prompt token ids of ``messages`` rendered with the template (see `render_chat`).

    Blocking (rendering and tokenizing): the servicer runs it with ``asyncio.to_thread``.
    """
    prompt = render_chat(tokenizer, messages, template=template, budget=budget)
    return tokenizer.encode(prompt, add_special_tokens=False)
