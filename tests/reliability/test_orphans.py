"""Children die with the inference server (issue 14, item 6).

SIGKILL of `python -m inference_service` (vLLM, tiny model loaded) must not leave vLLM's
EngineCore process behind holding memory and ports: it exits within seconds.
The trainer's workers follow their server the same way (`trainer_service.worker.die_with_parent`).
"""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest

from tests.reliability.stack import Stack


def test_engine_core_dies_with_a_killed_inference_server(tmp_path: Path, tiny_llm: Path) -> None:
    stack = Stack(tmp_path, tiny_llm)
    try:
        (engine_core,) = stack.engine_cores()
        assert stack.inference is not None
        stack.inference.terminate(signal.SIGKILL)
        stack.inference.proc.wait(30)
        _gone, alive = psutil.wait_procs([engine_core], timeout=10)
        if alive:
            for process in alive:
                process.kill()
            pytest.fail(f"vLLM's EngineCore (pid {engine_core.pid}) outlived its killed inference server")
    finally:
        stack.close()
