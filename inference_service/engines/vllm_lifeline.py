"""vLLM's EngineCore process dies with the inference server.

vLLM starts its EngineCore with ``context.Process(target=EngineCoreProc.run_engine_core)``
(``spawn``).  `install()` points that target at `run_engine_core` here, a module-level
function (picklable by name) that starts `server_kit.lifeline.watch_parent` in the child
and then runs vLLM's own entry point: a SIGKILLed server no longer leaves an EngineCore
holding memory and ports (issue 14).
"""

from __future__ import annotations

from typing import Any

_ORIGINAL: Any = None
"""vLLM's own ``EngineCoreProc.run_engine_core`` (a staticmethod), once installed."""


def run_engine_core(*args: Any, **kwargs: Any) -> None:
    """The EngineCore process's entry point: watch the parent, then run vLLM's."""
    from vllm.v1.engine.core import EngineCoreProc

    from server_kit.lifeline import watch_parent

    watch_parent()
    # Spawned: a fresh interpreter where the class is vLLM's own; forked: the patched
    # class, whose original this module kept.
    original = _ORIGINAL if _ORIGINAL is not None else EngineCoreProc.__dict__["run_engine_core"]
    target = getattr(original, "__func__", original)
    if target is run_engine_core:  # pragma: no cover - defensive
        raise RuntimeError("vLLM's EngineCore entry point is lost")
    target(*args, **kwargs)


def install() -> None:
    """Make vLLM start its EngineCore through `run_engine_core` (idempotent)."""
    global _ORIGINAL
    from vllm.v1.engine.core import EngineCoreProc

    current = EngineCoreProc.__dict__["run_engine_core"]
    if isinstance(current, staticmethod) and current.__func__ is run_engine_core:
        return
    _ORIGINAL = current
    EngineCoreProc.run_engine_core = staticmethod(run_engine_core)
