"""Chat prompts: messages rendered with the model's own chat template.

The template is the one the model ships (``tokenizer_config.json`` or
``chat_template.jinja``, which the catalog records), or a template string given with the
request.  Rendering uses transformers' ``apply_chat_template`` (a sandboxed jinja2
environment with ``raise_exception``, ``strftime_now`` and the ``{% generation %}``
extension) with ``add_generation_prompt=True``, so the prompt ends where the assistant's
answer begins.  The rendered text already holds the template's special tokens: encode it
with ``add_special_tokens=False``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server_kit.errors import FailedPrecondition, FieldViolation, InvalidArgument

if TYPE_CHECKING:
    from inference_service.engines.base import Tokenizer

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
) -> str:
    """Render ``messages`` into a prompt with the model's chat template (or ``template``).

    Raises:
        FailedPrecondition: ``NO_CHAT_TEMPLATE`` (no template anywhere).
        InvalidArgument: ``INVALID_CHAT_MESSAGES`` / ``EMPTY_CONVERSATION`` for bad
            messages, ``INVALID_CHAT_TEMPLATE`` for a template that does not parse,
            ``CHAT_TEMPLATE_ERROR`` when the template refuses the conversation (its
            ``raise_exception`` message, e.g. "roles must alternate").
    """
    import jinja2

    conversation = validate_messages(messages)
    chosen = resolve_template(tokenizer, template)
    try:
        rendered = tokenizer.hf_tokenizer.apply_chat_template(
            conversation,
            chat_template=chosen,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
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
