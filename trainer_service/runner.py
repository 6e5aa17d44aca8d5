"""Runs one job in a worker process, so training never blocks the server's event loop.

The server writes the job's `spec.json` into its folder and starts
`python -m trainer_service.worker spec.json`. The worker reports on its
standard output, one JSON event per line (`WorkerEvent`); everything the
libraries print goes to `worker.log` in the job folder. To stop a job early the
server writes `cancel` or `preempt` into the job's `control` file, which the
worker's training callback reads after every optimizer step.

Layout of a job folder (`{data_dir}/jobs/{job}`)::

    spec.json        what to train (written by the server)
    worker.pid       process id of the current worker
    control          stop request (cancel | preempt), when any
    worker.log       the worker's log (appended across resumes)
    checkpoints/     checkpoint-N folders; trainer_state.json marks a complete one
    output/          the trained adapter or model, registered in the catalog

The worker dies with the server (Linux parent-death signal), so a killed
trainer leaves no orphan training; the job is recovered at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("modelyard.trainer.runner")

# Environment of every worker: never reach the hub, no tokenizer thread pools fighting torch.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "PYTHONUNBUFFERED": "1",
}


@dataclass(frozen=True)
class JobPaths:
    """Where a job's files live."""

    root: Path

    @classmethod
    def of(cls, data_dir: Path, job_id: str) -> JobPaths:
        """The folder of job `job_id` under `data_dir/jobs`."""
        return cls(data_dir / "jobs" / job_id)

    @property
    def spec(self) -> Path:
        """The worker's instructions."""
        return self.root / "spec.json"

    @property
    def control(self) -> Path:
        """The stop-request file."""
        return self.root / "control"

    @property
    def pid(self) -> Path:
        """The process id of the job's current worker."""
        return self.root / "worker.pid"

    @property
    def log(self) -> Path:
        """The worker's log."""
        return self.root / "worker.log"

    @property
    def checkpoints(self) -> Path:
        """The checkpoint folders."""
        return self.root / "checkpoints"

    @property
    def output(self) -> Path:
        """The trained result."""
        return self.root / "output"


@dataclass
class WorkerSpec:
    """What a worker process trains (serialized as `spec.json`)."""

    job_id: str
    method: str
    base_model_path: str
    dataset_source: str
    dataset_format: str
    dataset_split: str
    hyperparameters: dict[str, Any]
    output_dir: str
    checkpoints_dir: str
    control_file: str
    resume_from: str = ""
    datasets_cache: str = ""
    allow_remote_code: bool = False
    parent_pid: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        """Write the spec as JSON (atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> WorkerSpec:
        """Read a spec written by `write`."""
        return cls(**json.loads(path.read_text(encoding="utf-8")))


@dataclass(frozen=True)
class WorkerEvent:
    """One line a worker reported: `type` and its fields.

    Types: `started` (step, total_steps), `progress` (step, total_steps,
    epoch, loss, learning_rate, samples_per_second, tokens_per_second,
    eta_seconds), `eval` (step, eval_loss, eval_perplexity), `checkpoint`
    (step, path), `stopped` (reason: cancel | preempt), `finished`
    (output_dir, metrics, sample), `failed` (reason, message).
    """

    type: str
    data: dict[str, Any]


def request_stop(control_file: Path, reason: str) -> None:
    """Ask the worker of a job to stop (`cancel` or `preempt`) after its current step."""
    control_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = control_file.with_suffix(".tmp")
    tmp.write_text(reason, encoding="utf-8")
    tmp.replace(control_file)


class WorkerProcess:
    """One worker process training one job."""

    def __init__(
        self, paths: JobPaths, spec: WorkerSpec, *, python: str = sys.executable, num_processes: int = 1
    ) -> None:
        self.paths = paths
        self.spec = spec
        self.python = python
        self.num_processes = num_processes
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        """The worker's process id once started."""
        return self.process.pid if self.process else None

    async def start(self) -> None:
        """Write the spec, clear any old stop request, and start the worker."""
        self.paths.root.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.paths.control.unlink()
        self.spec.parent_pid = os.getpid()
        self.spec.write(self.paths.spec)
        env = {**os.environ, **WORKER_ENV}
        command = [self.python, "-m", "trainer_service.worker", str(self.paths.spec)]
        if self.num_processes > 1:  # DDP: torchrun starts that many workers (trainer_service.ddp)
            command = [self.python, "-m", "trainer_service.ddp", "launch"]
            command += [f"--nproc-per-node={self.num_processes}", str(self.paths.spec)]
        with self.paths.log.open("ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                cwd=str(self.paths.root),
                env=env,
            )
        self.paths.pid.write_text(f"{self.process.pid}\n", encoding="utf-8")
        log.info("job %s: worker pid %d started", self.spec.job_id, self.process.pid)

    async def events(self) -> AsyncIterator[WorkerEvent]:
        """The worker's events until it closes its output (it exited)."""
        assert self.process is not None and self.process.stdout is not None, "start() first"
        while True:
            line = await self.process.stdout.readline()
            if not line:
                return
            try:
                payload = json.loads(line)
            except json.JSONDecodeError:
                log.warning("job %s: worker wrote a non-event line: %r", self.spec.job_id, line[:200])
                continue
            if isinstance(payload, dict) and isinstance(payload.get("type"), str):
                kind = payload.pop("type")
                yield WorkerEvent(kind, payload)

    def request_stop(self, reason: str) -> None:
        """Ask the worker to stop after its current step (`cancel` or `preempt`)."""
        request_stop(self.paths.control, reason)

    def kill(self) -> None:
        """Kill the worker at once."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def wait(self) -> int:
        """The worker's exit status (negative: killed by that signal)."""
        assert self.process is not None, "start() first"
        return await self.process.wait()

    def close(self) -> None:
        """Release the process's pipes once it has exited (asyncio leaves the transport open)."""
        transport = getattr(self.process, "_transport", None)
        if transport is not None:
            transport.close()

    def log_tail(self, limit: int = 1500) -> str:
        """The end of the worker's log."""
        try:
            data = self.paths.log.read_bytes()
        except FileNotFoundError:
            return ""
        return data[-limit:].decode("utf-8", errors="replace")
