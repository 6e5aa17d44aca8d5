"""Child processes die with their parent.

`watch_parent()` starts a daemon thread in a child process that kills the process
(SIGKILL to itself) once its parent is gone: ``os.getppid()`` no longer names the parent
(the child was reparented to init or a subreaper).  It is portable and, unlike Linux's
``PR_SET_PDEATHSIG``, does not depend on which *thread* of the parent started the child
(vLLM spawns its EngineCore from a worker thread of the inference server).
Used by vLLM's EngineCore (`inference_service.engines.vllm_lifeline`); the trainer's
workers have both (`trainer_service.worker.die_with_parent`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

POLL_SECONDS = 0.5
"""How often the watchdog looks at its parent: the longest an orphan lives on."""


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def watch_parent(parent_pid: int | None = None, *, interval: float = POLL_SECONDS) -> int:
    """Start the watchdog thread; returns the parent pid it watches.

    ``parent_pid`` defaults to the multiprocessing parent (a spawned or forked child) or
    else ``os.getppid()``.  A parent that already died before the call is seen at once.
    """
    if parent_pid is None:
        parent = multiprocessing.parent_process()
        parent_pid = parent.pid if parent is not None and parent.pid else os.getppid()
    expected = parent_pid
    if os.getppid() != expected:
        _kill_self()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != expected:
                _kill_self()

    threading.Thread(target=watch, name="modelyard-parent-watch", daemon=True).start()
    return expected
