"""One job trained by two processes: PyTorch DDP over gloo on the CPU, launched through torchrun.

The trainer with `MODELYARD_TRAINER_NUM_PROCESSES=2` runs a job's training in
two ranks (`trainer_service.ddp`). Proof that two ranks really trained
together: both report a process group of world size 2 on gloo; each saw half
of the data (the epoch after N steps is twice a single process's); and,
though each rank trained on its own rows with its own dropout, both ended
with byte-identical LoRA weights, which only all-reduced gradients give. The
weights changed from their initial zeros, and are what the catalog registered.

A cancel reaches both ranks at the same step (rank 0 decides, the decision
is broadcast): without that, one rank would stop while the other waits in the
next all-reduce.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from clients.catalog import CatalogClient
from clients.trainer import TrainerClient
from modelyard.trainer.v1 import trainer_service_pb2 as pb
from tests.helpers import ROOT
from tests.scaleout.conftest import BASE_ENV, Fleet, read_json
from trainer_service import ddp
from trainer_service.hyperparams import Hyperparams
from trainer_service.runner import JobPaths, WorkerSpec, request_stop

ROWS = 16  # rows of `chat_data`
BATCH = 2


def events_of(path: Path) -> list[dict[str, Any]]:
    """The events a rank above 0 wrote to its file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_rank_specs_leave_reporting_and_stopping_to_rank_0(tmp_path: Path) -> None:
    paths = JobPaths(tmp_path / "jobs" / "j")
    spec = WorkerSpec(
        job_id="j", method="LORA", base_model_path="/m", dataset_source="/d.jsonl", dataset_format="CHAT",
        dataset_split="", hyperparameters={}, output_dir=str(paths.output),
        checkpoints_dir=str(paths.checkpoints), control_file=str(paths.control), parent_pid=1,
    )  # fmt: skip
    folder = paths.root / ddp.RANKS_DIR
    folder.mkdir(parents=True)
    (folder / "stale.txt").write_text("from an earlier run")
    ddp.write_rank_specs(spec, folder, 3, launcher_pid=1234)

    rank0, rank1, rank2 = (WorkerSpec.read(ddp.rank_spec_path(folder, rank)) for rank in range(3))
    assert rank0.output_dir == spec.output_dir and rank0.control_file == spec.control_file
    assert rank0.checkpoints_dir == rank1.checkpoints_dir == spec.checkpoints_dir  # rank 0 writes them
    for rank, rank_spec in ((1, rank1), (2, rank2)):
        assert rank_spec.output_dir == str(ddp.rank_output_dir(folder, rank))
        assert rank_spec.control_file not in (spec.control_file, rank0.control_file)
    assert {s.parent_pid for s in (rank0, rank1, rank2)} == {1234}  # they die with the launcher
    assert not (folder / "stale.txt").exists()


def test_cpu_threads_are_shared_out_between_ranks() -> None:
    assert ddp.threads_per_rank(2, cpus=2) == 1
    assert ddp.threads_per_rank(4, cpus=16) == 4
    assert ddp.threads_per_rank(8, cpus=2) == 1


@pytest.mark.slow
def test_a_job_trains_in_two_ranks_that_end_with_identical_weights(
    fleet: Fleet, workdir: Path, tiny_llama: Path, chat_data: Path
) -> None:
    catalog = fleet.start(
        "catalog_service", "catalog", {"MODELYARD_CATALOG_ALLOWED_ROOTS": f"{workdir}:{fleet.folder}"}
    )
    catalog.wait_serving(60)
    trainer = fleet.start(
        "trainer_service",
        "trainer",
        {
            "MODELYARD_CATALOG_ADDRESS": catalog.address,
            "MODELYARD_TRAINER_NUM_PROCESSES": "2",
            "MODELYARD_TRAINER_DATASET_ROOTS": str(workdir),
            "MODELYARD_TRAINER_POLL_SECONDS": "0.3",
        },
    )
    with CatalogClient(catalog.address) as catalog_client:
        catalog_client.import_model(str(tiny_llama), model_id="tiny-llama")
        trainer.wait_serving(120)
        with TrainerClient(trainer.address, timeout=60) as client:
            job = client.create_training_job(
                "tiny-llama",
                str(chat_data),
                job_id="ddp-job",
                max_steps=2,
                batch_size=BATCH,
                learning_rate=1e-2,
                save_steps=1000,
            )
            done = client.wait_training_job(job.name, timeout=240)
        assert done.state == pb.TRAINING_JOB_STATE_SUCCEEDED, f"{done.error}\n{fleet.logs()}"
        # Each rank trained on its half of the rows: 2 steps of 2 ranks x 2 rows = half an epoch.
        assert done.progress.epoch == pytest.approx(2 * 2 * BATCH / ROWS)
        registered = catalog_client.get_model(done.output_model)

    folder = JobPaths.of(fleet.folder / "trainer", "ddp-job").root / ddp.RANKS_DIR
    results = [read_json(ddp.rank_result_path(folder, rank)) for rank in (0, 1)]
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["exit_code"] == 0
        assert (result["world_size"], result["backend"]) == (2, "gloo")
    rank0, rank1 = (result["weights_sha256"] for result in results)
    assert list(rank0) == ["adapter_model.safetensors"]
    assert rank1 == rank0  # the ranks' weights are identical, byte for byte
    catalog_hashes = {f.path: f.sha256 for f in registered.files}
    assert catalog_hashes["adapter_model.safetensors"] == rank0["adapter_model.safetensors"]
    assert not ddp.rank_output_dir(folder, 1).exists()  # rank 1's copy is deleted once hashed

    rank1_events = events_of(ddp.rank_events_path(folder, 1))
    assert (rank1_events[0]["type"], rank1_events[0]["total_steps"]) == ("started", 2)
    assert rank1_events[-1]["type"] == "finished"

    from safetensors.torch import load_file

    weights = load_file(str(Path(registered.local_path) / "adapter_model.safetensors"))
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert lora_b and any(bool(tensor.abs().sum() > 0) for tensor in lora_b), "training left LoRA B at zero"


class EventReader:
    """Reads a launcher's event lines on a thread, so every wait can be bounded."""

    def __init__(self, stream: Any) -> None:
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with contextlib.suppress(json.JSONDecodeError):
                self.lines.put(json.loads(line))
        self.lines.put(None)

    def next(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None at the end of the output."""
        return self.lines.get(timeout=timeout)


@pytest.mark.slow
def test_a_cancel_stops_both_ranks_at_the_same_step(
    tmp_path: Path, tiny_llama: Path, chat_data: Path
) -> None:
    paths = JobPaths(tmp_path / "jobs" / "cancelled")
    hyper = Hyperparams(max_steps=100_000, batch_size=BATCH, save_steps=100_000)
    spec = WorkerSpec(
        job_id="cancelled",
        method="LORA",
        base_model_path=str(tiny_llama),
        dataset_source=str(chat_data),
        dataset_format="CHAT",
        dataset_split="",
        hyperparameters=hyper.to_dict(),
        output_dir=str(paths.output),
        checkpoints_dir=str(paths.checkpoints),
        control_file=str(paths.control),
        parent_pid=os.getpid(),
    )
    spec.write(paths.spec)
    env = {**os.environ, **BASE_ENV, "PYTHONUNBUFFERED": "1"}
    with (paths.root / "launcher.log").open("wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "trainer_service.ddp", "launch", "--nproc-per-node=2", str(paths.spec)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
    try:
        reader = EventReader(launcher.stdout)
        events: list[dict[str, Any]] = []
        while not events or events[-1].get("step", 0) < 2:
            event = reader.next(timeout=180)
            assert event is not None, (paths.root / "launcher.log").read_text()[-3000:]
            events.append(event)
        request_stop(paths.control, "cancel")
        while (event := reader.next(timeout=120)) is not None:
            events.append(event)
        assert launcher.wait(60) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(10)

    folder = paths.root / ddp.RANKS_DIR
    rank1 = events_of(ddp.rank_events_path(folder, 1))
    assert events[-1] == {"type": "stopped", "reason": "cancel"}
    assert rank1[-1] == {"type": "stopped", "reason": "cancel"}
    last_step = [e["step"] for e in events if e["type"] == "progress"][-1]
    assert [e["step"] for e in rank1 if e["type"] == "progress"][-1] == last_step
    assert last_step < 100_000
    assert [read_json(ddp.rank_result_path(folder, rank))["exit_code"] for rank in (0, 1)] == [0, 0]
