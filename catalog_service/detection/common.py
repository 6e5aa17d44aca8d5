"""Small helpers shared by the detectors: strict JSON reading, model-card metadata, sizes.

Every reader here turns a broken file into a domain error a person can act on:
invalid JSON is `InvalidArgument` with reason `CORRUPT_JSON` and the file, line and
column in the error metadata.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catalog_service.paths import open_regular
from server_kit.errors import InvalidArgument

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
GGUF_SUFFIX = ".gguf"
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Weight files stored with Python pickle: never loaded unless explicitly allowed."""
NOT_WEIGHTS: frozenset[str] = frozenset({"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"})
"""Pickle files of trainer checkpoints that are not model weights (never loaded by the catalog)."""


def is_pickle_weights(name: str) -> bool:
    """Whether `name` is a pickle weights file (`pytorch_model.bin`, `x.ckpt`; not `training_args.bin`)."""
    lower = name.lower()
    return lower.endswith(PICKLE_SUFFIXES) and lower not in NOT_WEIGHTS


def display_path(path: Path, base: Path | None = None) -> str:
    """`path` relative to `base` when it lies inside it, else the file name."""
    if base is not None:
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            pass
    return path.name


def read_json(path: Path, *, base: Path | None = None) -> Any:
    """Parse the JSON file at `path`.

    Raises:
        InvalidArgument: reason `CORRUPT_JSON` when the file is not valid JSON (with the
            file, line and column) or not UTF-8.
    """
    name = display_path(path, base)
    try:
        with open_regular(path, name) as handle:  # never blocks on a FIFO
            text = handle.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start}); replace the file with valid JSON.",
            reason="CORRUPT_JSON",
            metadata={"file": name},
        ) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(
            f"{name} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. "
            "Fix or replace the file and try again.",
            reason="CORRUPT_JSON",
            metadata={"file": name, "line": exc.lineno, "column": exc.colno},
        ) from exc
    except (RecursionError, ValueError) as exc:
        # Nesting deeper than the parser's recursion limit, or an integer over Python's
        # digit limit: still a file we cannot read, not a server fault.
        raise InvalidArgument(
            f"{name} is not JSON this catalog can read ({type(exc).__name__}); fix or replace the file.",
            reason="CORRUPT_JSON",
            metadata={"file": name},
        ) from exc


def read_json_object(path: Path, *, base: Path | None = None) -> dict[str, Any]:
    """Parse `path` and require a JSON object at the top level (`CORRUPT_JSON` otherwise)."""
    data = read_json(path, base=base)
    if not isinstance(data, dict):
        name = display_path(path, base)
        raise InvalidArgument(
            f"{name} must hold a JSON object, found a {type(data).__name__}; fix or replace the file.",
            reason="CORRUPT_JSON",
            metadata={"file": name, "line": 1},
        )
    return data


def read_json_if_present(path: Path, *, base: Path | None = None) -> dict[str, Any] | None:
    """`read_json_object(path)` when the file exists, else None."""
    if not path.is_file():
        return None
    return read_json_object(path, base=base)


def as_int(value: Any) -> int | None:
    """`value` as an int when it is a whole number (bools and floats with fractions are not)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        try:
            number = float(text)
        except ValueError:
            return None
        return int(number) if number.is_integer() else None
    return None


def as_float(value: Any) -> float | None:
    """`value` as a float when it is a number (or a numeric string); bools are not numbers."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def as_str_list(value: Any) -> list[str]:
    """A string or a list of strings as a list of non-empty strings (anything else: empty)."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if isinstance(v, (str, int, float)) and str(v).strip()]
    return []


def unique(values: Iterable[str]) -> list[str]:
    """`values` without duplicates, first occurrence kept."""
    seen: set[str] = set()
    out: list[str] = []
    for value in values:
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out


@dataclass
class CardMetadata:
    """Author, license, tags and languages stated by a model card or file metadata."""

    author: str = ""
    license: str = ""
    tags: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)
    base_model: str = ""

    def merge(self, other: CardMetadata) -> None:
        """Fill the fields this one lacks from `other`."""
        self.author = self.author or other.author
        self.license = self.license or other.license
        self.tags = unique([*self.tags, *other.tags])
        self.languages = unique([*self.languages, *other.languages])
        self.base_model = self.base_model or other.base_model


_FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.DOTALL)


def read_model_card(folder: Path) -> CardMetadata:
    """Metadata from the YAML front matter of `folder/README.md` (empty when absent).

    A README is free text: front matter that is not valid YAML is ignored (logged), it
    never fails an import.
    """
    readme = folder / "README.md"
    if not readme.is_file():
        return CardMetadata()
    try:
        text = readme.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return CardMetadata()
    match = _FRONT_MATTER.match(text)
    if not match:
        return CardMetadata()
    import yaml

    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        log.warning("ignoring the front matter of %s: not valid YAML (%s)", readme, exc)
        return CardMetadata()
    if not isinstance(data, Mapping):
        return CardMetadata()
    return card_from_mapping(data)


def card_from_mapping(data: Mapping[str, Any]) -> CardMetadata:
    """CardMetadata from a model-card-like mapping (`license`, `tags`, `language`, ...)."""
    license_value = data.get("license")
    licenses = as_str_list(license_value)
    license_name = licenses[0] if licenses else ""
    if license_name == "other" and isinstance(data.get("license_name"), str):
        license_name = str(data["license_name"])
    author = ""
    for key in ("author", "model_creator", "creator"):
        if isinstance(data.get(key), str) and data[key].strip():
            author = data[key].strip()
            break
    base_models = as_str_list(data.get("base_model"))
    return CardMetadata(
        author=author,
        license=license_name,
        tags=unique(as_str_list(data.get("tags"))),
        languages=unique(as_str_list(data.get("language") or data.get("languages"))),
        base_model=base_models[0] if base_models else "",
    )
