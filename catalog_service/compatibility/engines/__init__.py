"""Registry of engine tables, keyed by the engine name workers report.

Each engine is one module of this package that builds an `EngineTable` and
calls `register(...)` on import. Adding an engine is adding one module and one
import line at the bottom of this file.
"""

from __future__ import annotations

from catalog_service.compatibility.context import EngineTable

_REGISTRY: dict[str, EngineTable] = {}


def register(table: EngineTable) -> EngineTable:
    """Register an engine table under `table.name` (replacing one of the same name)."""
    _REGISTRY[table.name] = table
    return table


def get(name: str) -> EngineTable | None:
    """The table of engine `name`, or None when no such engine is registered."""
    return _REGISTRY.get(name)


def names() -> list[str]:
    """Registered engine names, sorted."""
    return sorted(_REGISTRY)


def tables() -> list[EngineTable]:
    """Registered engine tables, sorted by name."""
    return [_REGISTRY[name] for name in names()]


# One line per engine: importing the module registers its table.
from catalog_service.compatibility.engines import diffusers as diffusers  # noqa: E402
from catalog_service.compatibility.engines import llama_cpp as llama_cpp  # noqa: E402
from catalog_service.compatibility.engines import peft as peft  # noqa: E402
from catalog_service.compatibility.engines import transformers as transformers  # noqa: E402
from catalog_service.compatibility.engines import vllm as vllm  # noqa: E402
