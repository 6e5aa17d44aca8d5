"""`python -m trainer_service.worker SPEC`: train one job and report events on stdout.

Started by `trainer_service.runner.WorkerProcess`. The original standard
output becomes the event channel (one JSON object per line) and file
descriptor 1 is pointed at the log, so whatever a library prints cannot
corrupt the events. Every outcome is reported as an event (`finished`,
`stopped`, `failed`) and the process exits 0; a non-zero exit without a final
event means the worker crashed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any

from server_kit.errors import ModelyardError
from trainer_service.datasets import DatasetFormat, Method, check_rows, load_rows, split_rows
from trainer_service.ddp import is_main_rank
from trainer_service.hyperparams import Hyperparams
from trainer_service.rewards import required_fields
from trainer_service.runner import WorkerSpec

SUPERVISED = (Method.LORA, Method.QLORA, Method.FULL)
"""Methods whose eval loss is a language-model loss (so perplexity means something)."""

log = logging.getLogger("modelyard.trainer.worker")


class EventWriter:
    """Writes events as JSON lines to the event channel."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    @classmethod
    def take_stdout(cls) -> EventWriter:
        """Keep the real stdout for events; send fd 1 (library prints) to stderr, the log."""
        sys.stdout.flush()
        events_fd = os.dup(1)
        os.dup2(2, 1)
        return cls(os.fdopen(events_fd, "w", buffering=1, encoding="utf-8"))

    def emit(self, kind: str, **fields: Any) -> None:
        """Write one event."""
        clean = {k: v for k, v in fields.items() if v is not None}
        self.stream.write(json.dumps({"type": kind, **clean}, default=str) + "\n")
        self.stream.flush()


def die_with_parent(parent_pid: int) -> None:
    """Get SIGKILL when the server that started us dies (Linux), so no training outlives it."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if parent_pid and os.getppid() != parent_pid:
        os._exit(3)  # the parent died before we asked to follow it


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and abs(number) != float("inf") else None


MAX_LOGGED_METRICS = 48


def logged_numbers(logs: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a log entry (at most `MAX_LOGGED_METRICS`), for the job's metric history."""
    numbers: dict[str, float] = {}
    for key, value in logs.items():
        number = _finite(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        if number is not None and len(key) <= 64:
            numbers[key] = number
            if len(numbers) >= MAX_LOGGED_METRICS:
                break
    return numbers


def make_callback(events: EventWriter, ctx: Any, *, perplexity: bool) -> Any:
    """The TrainerCallback that reports progress, evals and checkpoints, and stops on request."""
    from transformers import TrainerCallback

    from trainer_service.evaluation import eval_metrics_of
    from trainer_service.strategies.base import safe_exp

    class JobCallback(TrainerCallback):
        def __init__(self) -> None:
            self.start_time = time.monotonic()
            self.start_step = 0
            self.last_time = self.start_time
            self.last_step = 0
            self.last_tokens = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start_time = self.last_time = time.monotonic()
            self.start_step = self.last_step = state.global_step
            self.last_tokens = state.num_input_tokens_seen
            events.emit("started", step=state.global_step, total_steps=state.max_steps)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if ctx.stop.check():
                control.should_training_stop = True
                control.should_save = True  # keep the progress made so far

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            logs = logs or {}
            now = time.monotonic()
            step = state.global_step
            if "loss" in logs:
                steps = step - self.last_step
                elapsed = now - self.last_time
                batch = ctx.hyper.effective_batch_size * int(os.environ.get("WORLD_SIZE", "1"))  # DDP ranks
                samples = steps * batch / elapsed if steps > 0 and elapsed > 0 else None
                tokens = state.num_input_tokens_seen - self.last_tokens
                tokens_rate = tokens / elapsed if tokens > 0 and elapsed > 0 else None
                done = step - self.start_step
                eta = (now - self.start_time) / done * (state.max_steps - step) if done > 0 else None
                events.emit(
                    "progress",
                    step=step,
                    total_steps=state.max_steps,
                    epoch=_finite(state.epoch),
                    loss=_finite(logs.get("loss")),
                    learning_rate=_finite(logs.get("learning_rate")),
                    samples_per_second=samples,
                    tokens_per_second=tokens_rate,
                    eta_seconds=max(eta, 0.0) if eta is not None else None,
                    metrics=logged_numbers(logs),
                )
                self.last_time, self.last_step, self.last_tokens = now, step, state.num_input_tokens_seen
            task_metrics = eval_metrics_of(logs)
            if "eval_loss" in logs or task_metrics:
                eval_loss = _finite(logs.get("eval_loss"))
                events.emit(
                    "eval",
                    step=step,
                    epoch=_finite(state.epoch),
                    eval_loss=eval_loss,
                    eval_perplexity=safe_exp(eval_loss) if perplexity and eval_loss is not None else None,
                    task_metrics=task_metrics,
                    metrics=logged_numbers(logs),
                )

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if (path / "trainer_state.json").is_file():
                events.emit("checkpoint", step=state.global_step, path=str(path))

    return JobCallback()


def run(spec: WorkerSpec, events: EventWriter) -> None:
    """Train the job of `spec`, reporting every step; raises on failure."""
    from trainer_service.strategies import strategy_for
    from trainer_service.strategies.base import (
        OutputCheckError,
        StopRequest,
        TrainContext,
        load_tokenizer,
    )

    method = Method(spec.method)
    strategy = strategy_for(method)
    strategy.validate()
    hyper = Hyperparams.from_dict(spec.hyperparameters)
    fmt = DatasetFormat(spec.dataset_format)
    base_path = Path(spec.base_model_path)

    # The data may have changed since the job was queued: check it again before training on it.
    cache = Path(spec.datasets_cache) if spec.datasets_cache else None
    rows = load_rows(spec.dataset_source, split=spec.dataset_split, datasets_cache=cache).rows
    tokenizer = load_tokenizer(base_path, allow_remote_code=spec.allow_remote_code)
    check_rows(
        rows,
        fmt,
        tokenizer=tokenizer,
        max_seq_length=hyper.max_seq_length,
        extra_fields=required_fields(hyper.grpo_reward_functions) if method == Method.GRPO else (),
    ).raise_if_invalid()
    train_rows, eval_rows = split_rows(rows, hyper.eval_split, hyper.seed)

    ctx = TrainContext(
        job_id=spec.job_id,
        method=method,
        base_model_path=base_path,
        rows=train_rows,
        eval_rows=eval_rows,
        dataset_format=fmt,
        hyper=hyper,
        output_dir=Path(spec.output_dir),
        checkpoints_dir=Path(spec.checkpoints_dir),
        resume_from=Path(spec.resume_from) if spec.resume_from else None,
        stop=StopRequest(Path(spec.control_file)),
        allow_remote_code=spec.allow_remote_code,
        task=str(spec.extra.get("task") or ""),
        reward_model_path=Path(spec.extra["reward_model_path"])
        if spec.extra.get("reward_model_path")
        else None,
    )
    callback = make_callback(events, ctx, perplexity=method in SUPERVISED)
    result = strategy.train(ctx, [callback])
    if result.stopped:
        events.emit("stopped", reason=result.stopped)
        return
    assert result.output_dir is not None
    if not is_main_rank():  # a DDP rank > 0: rank 0 checks and reports the result (trainer_service.ddp)
        events.emit("finished", output_dir=str(result.output_dir), metrics=result.metrics)
        return
    try:
        sample = strategy.check_output(result.output_dir, base_path)
    except OutputCheckError as error:
        raise ModelyardError(str(error), reason="OUTPUT_CHECK_FAILED") from error
    events.emit(
        "finished",
        output_dir=str(result.output_dir),
        metrics={k: v for k, v in result.metrics.items() if _finite(v) is not None},
        sample=sample[:200],
    )


def failure_of(error: BaseException) -> tuple[str, str]:
    """The reason and message a failed job shows for `error`."""
    if isinstance(error, ModelyardError):
        return error.reason, error.message
    name = type(error).__name__
    if name == "OutOfMemoryError" or isinstance(error, MemoryError):
        return "OUT_OF_MEMORY", f"training ran out of memory: {error}"[:1000]
    return "TRAINING_FAILED", f"{name}: {error}"[:1000]


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m trainer_service.worker SPEC`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m trainer_service.worker SPEC.json", file=sys.stderr)
        return 2
    events = EventWriter.take_stdout()
    spec = WorkerSpec.read(Path(args[0]))
    die_with_parent(spec.parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info(
        "job %s: %s on %s (resume from %s)",
        spec.job_id,
        spec.method,
        spec.base_model_path,
        spec.resume_from or "-",
    )
    try:
        run(spec, events)
    except BrokenPipeError:
        return 1  # the server is gone; the job is recovered when it restarts
    except BaseException as error:
        traceback.print_exc()
        reason, message = failure_of(error)
        with contextlib.suppress(BrokenPipeError):
            events.emit("failed", reason=reason, message=message)
        if isinstance(error, KeyboardInterrupt | SystemExit):
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
