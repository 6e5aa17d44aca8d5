"""Multi-process training of one job with PyTorch DDP, launched through torchrun.

With `MODELYARD_TRAINER_NUM_PROCESSES=N` (N > 1) the runner starts
`python -m trainer_service.ddp launch --nproc-per-node N SPEC` instead of the
single worker. The launcher is torchrun's elastic agent run in-process
(`--standalone`: a private rendezvous on a free local port, so several jobs
can train at once on one host). It starts N ranks, each running the ordinary
worker (`trainer_service.worker`) on its own copy of the spec; transformers'
Trainer sees torchrun's environment and trains with DistributedDataParallel
(NCCL on GPUs, one rank per GPU; gloo on the CPU). `accelerate launch --multi_gpu`
would do the same; `accelerate launch --cpu --num_processes N` silently runs
only one process (no DDP at all), so torchrun it is.

What differs from a single worker:

- Rank 0 reports to the server (its events on the launcher's standard
  output) and writes, checks and hands over the output. Ranks above 0 train in
  lockstep (gradients are all-reduced every step), write their events to
  `ddp/rank-K.events.jsonl` and their copy of the result to
  `ddp/rank-K/output`, which is hashed and deleted when they finish.
- Every rank writes `ddp/rank-K.result.json`: the world size and backend its
  process group had, its exit status, and the sha256 of each safetensors file
  it saved. Identical hashes across ranks show the ranks ended with the same
  weights though each trained on its own shard of the data.
- A stop request (cancel, preempt) is read by rank 0 alone from the job's
  control file and broadcast, so every rank stops after the same step
  (`agreed_stop`).
- The launcher dies with the server (parent-death signal) and the ranks die
  with the launcher; a rank that fails makes torchrun stop the others.

CPU threads: each rank gets `OMP_NUM_THREADS` = cores / N unless the
environment sets it.

Layout added to the job folder::

    ddp/rank-K.spec.json        the spec rank K runs
    ddp/rank-K.events.jsonl     events of rank K > 0
    ddp/rank-K.result.json      world size, backend, exit status, weight hashes
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from trainer_service.runner import WorkerSpec

log = logging.getLogger("modelyard.trainer.ddp")

RANKS_DIR = "ddp"


def ranks_dir(spec_path: Path) -> Path:
    """Where the ranks of the job of `spec_path` keep their files."""
    return spec_path.parent / RANKS_DIR


def rank_spec_path(folder: Path, rank: int) -> Path:
    """The spec rank `rank` runs."""
    return folder / f"rank-{rank}.spec.json"


def rank_events_path(folder: Path, rank: int) -> Path:
    """The events of rank `rank` > 0 (rank 0's go to the server)."""
    return folder / f"rank-{rank}.events.jsonl"


def rank_result_path(folder: Path, rank: int) -> Path:
    """What rank `rank` reports when it ends."""
    return folder / f"rank-{rank}.result.json"


def rank_output_dir(folder: Path, rank: int) -> Path:
    """Where rank `rank` > 0 saves its copy of the result (deleted once hashed)."""
    return folder / f"rank-{rank}" / "output"


def threads_per_rank(num_processes: int, cpus: int | None = None) -> int:
    """CPU threads for each of `num_processes` ranks: the cores shared out, at least one."""
    return max(1, (cpus or os.cpu_count() or 1) // max(num_processes, 1))


def write_rank_specs(spec: WorkerSpec, folder: Path, num_processes: int, launcher_pid: int) -> None:
    """Write one spec per rank into `folder` (cleared first).

    Rank 0 runs the job's spec. A rank K > 0 saves to its own folder and
    watches a control file nobody writes: it stops when rank 0 tells it to.
    """
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    replace(spec, parent_pid=launcher_pid).write(rank_spec_path(folder, 0))
    for rank in range(1, num_processes):
        replace(
            spec,
            output_dir=str(rank_output_dir(folder, rank)),
            control_file=str(folder / f"rank-{rank}.control"),
            parent_pid=launcher_pid,
        ).write(rank_spec_path(folder, rank))


def launch(spec_path: Path, num_processes: int) -> int:
    """Run the job of `spec_path` in `num_processes` ranks under torchrun; the exit status."""
    from trainer_service.worker import die_with_parent

    spec_path = spec_path.resolve()
    spec = WorkerSpec.read(spec_path)
    die_with_parent(spec.parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folder = ranks_dir(spec_path)
    write_rank_specs(spec, folder, num_processes, os.getpid())
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(num_processes)))
    log.info(
        "job %s: %d ranks under torchrun (%s threads each)",
        spec.job_id,
        num_processes,
        os.environ["OMP_NUM_THREADS"],
    )
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    arguments = [
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={num_processes}",
        "--max-restarts=0",
        "--module",
        "trainer_service.ddp",
        "rank",
        str(folder),
    ]
    try:
        torchrun(arguments)
    except ChildFailedError as error:
        log.error("job %s: a rank failed: %s", spec.job_id, error.format_msg())
        return 1
    return 0


def run_rank(folder: Path) -> int:
    """One rank (started by torchrun): train with the worker, then report in `rank-K.result.json`."""
    from trainer_service import worker

    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        # Only rank 0 talks to the server: the others' events go to their own file.
        sys.stdout.flush()
        descriptor = os.open(rank_events_path(folder, rank), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(descriptor, 1)
        os.close(descriptor)
    spec_path = rank_spec_path(folder, rank)
    code = worker.main([str(spec_path)])
    output = Path(WorkerSpec.read(spec_path).output_dir)
    result: dict[str, Any] = {"rank": rank, "exit_code": code, **process_group_info()}
    result["weights_sha256"] = weight_hashes(output)
    rank_result_path(folder, rank).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if rank != 0:
        shutil.rmtree(output.parent, ignore_errors=True)
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return code


def process_group_info() -> dict[str, Any]:
    """The world size and backend of this process's process group (None when there is none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return {"world_size": None, "backend": None}
    return {"world_size": dist.get_world_size(), "backend": str(dist.get_backend())}


def weight_hashes(output_dir: Path) -> dict[str, str]:
    """sha256 of every `*.safetensors` file in `output_dir` (empty when there is none)."""
    hashes = {}
    for path in sorted(output_dir.glob("*.safetensors")) if output_dir.is_dir() else []:
        digest = hashlib.sha256()
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        hashes[path.name] = digest.hexdigest()
    return hashes


def agreed_stop(local: str | None) -> str | None:
    """The stop decision every rank acts on: rank 0's `local` reading, broadcast to all ranks.

    Outside a multi-process run it is `local`. Every rank must call it after
    the same steps (the training callback does, after each optimizer step).
    """
    try:
        import torch.distributed as dist
    except ImportError:
        return local
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return local
    decision: list[str | None] = [local]
    dist.broadcast_object_list(decision, src=0)
    return decision[0]


def is_main_rank() -> bool:
    """True in a single-process run and in rank 0 of a multi-process one."""
    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer_service.ddp launch --nproc-per-node N SPEC` | `... rank FOLDER` (torchrun's)."""
    parser = argparse.ArgumentParser(prog="python -m trainer_service.ddp", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    launch_parser = commands.add_parser("launch", help="train the job of SPEC in N processes")
    launch_parser.add_argument("--nproc-per-node", type=int, required=True, help="processes (ranks)")
    launch_parser.add_argument("spec", type=Path, help="the job's spec.json")
    rank_parser = commands.add_parser("rank", help="one rank (started by the launcher through torchrun)")
    rank_parser.add_argument("folder", type=Path, help="the job's ddp folder")
    args = parser.parse_args(argv)
    if args.command == "launch":
        if args.nproc_per_node < 1:
            parser.error("--nproc-per-node must be >= 1")
        return launch(args.spec, args.nproc_per_node)
    return run_rank(args.folder)


if __name__ == "__main__":
    sys.exit(main())
