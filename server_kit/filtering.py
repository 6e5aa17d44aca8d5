"""A parser for the subset of AIP-160 filters the List RPCs accept.

Grammar (whitespace between tokens is free)::

    filter := term ( "AND" term )*
    term   := field op value
    field  := name ( "." key )*            e.g. `state`, `labels.team`
    op     := "=" | "!=" | ":"             ":" is "has" (membership / presence)
    value  := quoted | bare                "nlp", 'a \\"b\\"', READY, llama*

A quoted value takes backslash escapes (`\\"`, `\\'`, `\\\\`, `\\n`, `\\t`); a bare
value runs to the next whitespace. `OR`, `NOT`, parentheses and comparisons are
refused with a message, never half-understood.

Parsing only produces `Term`s: the store maps each term to a column and a bound
parameter, so a filter never becomes SQL text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from server_kit.errors import FieldViolation, InvalidArgument

EQ = "="
NE = "!="
HAS = ":"

_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_][A-Za-z0-9_./-]*)?")
_BARE = re.compile(r"[^\s\"'()]+")
_WORD = re.compile(r"[A-Za-z]+")
_OPS = ("!=", "<=", ">=", "=", ":", "<", ">")
_UNSUPPORTED_KEYWORDS = {"OR", "NOT"}
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "n": "\n", "t": "\t"}


@dataclass(frozen=True)
class Term:
    """One `field op value` comparison of a filter."""

    field: str
    op: str
    value: str
    quoted: bool = False


def filter_error(message: str) -> InvalidArgument:
    """The error for a filter the service cannot use (reason INVALID_FILTER)."""
    return InvalidArgument(message, reason="INVALID_FILTER", violations=[FieldViolation("filter", message)])


def field_allowed(field: str, allowed: Iterable[str]) -> bool:
    """Whether `field` matches one of `allowed` (`labels.*` allows any `labels.KEY`)."""
    for pattern in allowed:
        if pattern.endswith(".*"):
            prefix = pattern[:-1]
            if field.startswith(prefix) and len(field) > len(prefix):
                return True
        elif field == pattern:
            return True
    return False


def parse_filter(text: str, allowed: Iterable[str]) -> list[Term]:
    """Parse `text` into terms joined by AND; fields outside `allowed` are refused.

    `allowed` lists field names; an entry ending in `.*` (e.g. `labels.*`) allows
    any key under that prefix. An empty or blank filter gives no terms.
    """
    allowed = list(allowed)
    parser = _Parser(text)
    terms = parser.parse()
    for term in terms:
        if not field_allowed(term.field, allowed):
            raise filter_error(f"unknown filter field {term.field!r}; allowed fields: {', '.join(allowed)}")
    return terms


def canonical(terms: Iterable[Term]) -> str:
    """A stable text form of parsed terms (used to bind page tokens to a filter)."""
    return " AND ".join(f"{t.field}{t.op}{t.value!r}" for t in terms)


class _Parser:
    """A hand-written scanner/parser over the filter text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def parse(self) -> list[Term]:
        terms: list[Term] = []
        self._skip_space()
        if self.pos >= len(self.text):
            return terms
        while True:
            terms.append(self._term())
            self._skip_space()
            if self.pos >= len(self.text):
                return terms
            word = self._peek_word()
            if word == "AND":
                self.pos += 3
                self._skip_space()
                if self.pos >= len(self.text):
                    raise filter_error("filter ends with AND; a term must follow it")
                continue
            if word in _UNSUPPORTED_KEYWORDS:
                raise filter_error(f"{word} is not supported in filters; join terms with AND")
            raise filter_error(
                f"expected AND at position {self.pos} of the filter, found {self.text[self.pos :][:20]!r}"
            )

    def _term(self) -> Term:
        start = self.pos
        if self.text[self.pos] in "()":
            raise filter_error("parentheses are not supported in filters; join terms with AND")
        word = self._peek_word()
        if word in _UNSUPPORTED_KEYWORDS:
            raise filter_error(f"{word} is not supported in filters; join terms with AND")
        if word == "AND":
            raise filter_error(f"expected a term at position {start} of the filter, found AND")
        match = _FIELD.match(self.text, self.pos)
        if not match:
            raise filter_error(
                f"expected a field name at position {start} of the filter, found {self.text[start:][:20]!r}"
            )
        field = match.group(0)
        self.pos = match.end()
        self._skip_space()
        op = next((o for o in _OPS if self.text.startswith(o, self.pos)), None)
        if op is None:
            raise filter_error(
                f"expected =, != or : after {field!r} in the filter, found {self.text[self.pos :][:20]!r}"
            )
        if op not in (EQ, NE, HAS):
            raise filter_error(f"operator {op} is not supported in filters; use =, != or :")
        self.pos += len(op)
        self._skip_space()
        value, quoted = self._value(field)
        return Term(field, op, value, quoted)

    def _value(self, field: str) -> tuple[str, bool]:
        if self.pos >= len(self.text):
            raise filter_error(f"filter term on {field!r} has no value")
        quote = self.text[self.pos]
        if quote in "\"'":
            return self._quoted(quote), True
        match = _BARE.match(self.text, self.pos)
        if not match:
            raise filter_error(f"filter term on {field!r} has no value")
        self.pos = match.end()
        return match.group(0), False

    def _quoted(self, quote: str) -> str:
        start = self.pos
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "\\":
                if self.pos + 1 >= len(self.text):
                    break
                escaped = self.text[self.pos + 1]
                if escaped not in _ESCAPES:
                    raise filter_error(f"unknown escape \\{escaped} in the filter at position {self.pos}")
                out.append(_ESCAPES[escaped])
                self.pos += 2
                continue
            if char == quote:
                self.pos += 1
                return "".join(out)
            out.append(char)
            self.pos += 1
        raise filter_error(f"unterminated string starting at position {start} of the filter")

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _peek_word(self) -> str:
        match = _WORD.match(self.text, self.pos)
        if not match:
            return ""
        end = match.end()
        # A keyword stands alone: `ANDROID=x` is a field, not AND.
        if end < len(self.text) and not self.text[end].isspace() and self.text[end] not in "()":
            return ""
        return match.group(0)
