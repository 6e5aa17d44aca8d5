"""Settings from defaults, `MODELYARD_*` environment variables and flags.

A service declares its settings as a dataclass whose fields carry `setting()`
metadata (environment variable, flag help). `load()` reads them in the order
default < environment < command-line flag, so the same value can come from a
compose file or a terminal. Lists are `:`-separated in the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def setting(default: Any, env: str, help: str) -> Any:
    """A dataclass field read from environment variable `env` and flag `--<field-name>`."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"env": env, "help": help})
    return dataclasses.field(default=default, metadata={"env": env, "help": help})


def default_data_dir() -> Path:
    """`$MODELYARD_DATA_DIR`, else `~/.modelyard`."""
    return Path(os.environ.get("MODELYARD_DATA_DIR", str(Path.home() / ".modelyard"))).expanduser()


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; `list[str]` stays."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _convert(raw: str, tp: Any, name: str) -> Any:
    tp = _base_type(tp)
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        return [_convert(part, inner, name) for part in raw.split(os.pathsep) if part]
    if tp is bool:
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError(f"{name}: expected a boolean, got {raw!r}")
    if tp is Path:
        return Path(raw).expanduser()
    try:
        return tp(raw)
    except ValueError as exc:
        raise ValueError(f"{name}: expected {tp.__name__}, got {raw!r}") from exc


def add_arguments(cls: type, parser: argparse.ArgumentParser) -> None:
    """Add one `--flag` per setting of dataclass `cls` (defaults stay unset)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        env = field.metadata.get("env")
        if not env:
            continue
        flag = "--" + field.name.replace("_", "-")
        tp = _base_type(hints[field.name])
        default: Any = field.default
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        shown = str(default) if isinstance(default, Path) else repr(default)
        help_text = f"{field.metadata['help']} (env {env}; default {shown})"
        if tp is bool:
            parser.add_argument(
                flag, dest=field.name, default=None, action=argparse.BooleanOptionalAction, help=help_text
            )
        else:
            parser.add_argument(
                flag, dest=field.name, default=None, metavar=field.name.upper(), help=help_text
            )


def load(
    cls: type[T],
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> T:
    """Build settings `cls`: defaults, then environment, then parsed flags, then overrides."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        env = field.metadata.get("env")
        raw: Any = None
        if env and env in environ:
            raw = environ[env]
        if args is not None and getattr(args, field.name, None) is not None:
            raw = getattr(args, field.name)
        if field.name in overrides:
            values[field.name] = overrides[field.name]
        elif raw is not None:
            values[field.name] = (
                raw if not isinstance(raw, str) else _convert(raw, hints[field.name], env or field.name)
            )
    return cls(**values)


def parse(cls: type[T], argv: Sequence[str] | None, prog: str, description: str) -> T:
    """Parse `argv` into settings `cls` (for `python -m <service>`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(cls, parser)
    return load(cls, parser.parse_args(argv))
