"""`modelyard train ...` and `modelyard jobs {list,show,watch,cancel,plot}`."""

from __future__ import annotations

import argparse
import json
import sys
from itertools import islice
from pathlib import Path

import grpc

from clients.commands.common import (
    TRAINER,
    HelpFormatter,
    Subparsers,
    label,
    local_or_as_is,
    options_parser,
    parse_labels,
    trainer_client,
)
from clients.commands.plot import (
    HistoryRecorder,
    history_from_points,
    load_trainer_state,
    render_png,
    render_terminal,
)
from clients.commands.views import JOB_HEADERS, event_line, job_block, job_rows, job_state, progress_text
from clients.errors import ModelyardRpcError
from clients.output import StatusLine, print_json, print_json_line, table
from clients.trainer import TERMINAL_STATES, TrainerClient, job_name
from modelyard.trainer.v1 import trainer_service_pb2 as pb

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2

METHODS = ["lora", "qlora", "full", "dpo", "orpo", "kto", "reward", "grpo"]
FORMATS = [
    "text",
    "prompt_completion",
    "chat",
    "preference",
    "alpaca",
    "sharegpt",
    "unpaired_preference",
    "prompt_only",
]
TASKS = ["summarization", "question_answering"]
REWARD_FUNCTIONS = ["answer_match", "repetition_penalty", "think_format", "length"]


def register(sub: Subparsers) -> None:
    """Add `train` and `jobs`."""
    options = options_parser(TRAINER)
    train = sub.add_parser(
        "train",
        parents=[options],
        help="fine-tune a catalog model",
        formatter_class=HelpFormatter,
        description=(
            "Create a training job that fine-tunes BASE_MODEL (a catalog model) on DATASET (a local\n"
            "JSONL/JSON/Parquet file or folder, or a `datasets` name in the local cache). The\n"
            "result is registered in the catalog as a child of the base model. With --watch the\n"
            "job is followed to its end with a progress bar (step/total, loss, ETA); the exit code\n"
            "is then 0 only when the job SUCCEEDED."
        ),
        epilog=(
            "unset hyperparameters take the trainer's defaults (1 epoch, lr 2e-4 for LoRA, batch 4,\n"
            "LoRA r 8 / alpha 16, 10 % of the rows held out for evaluation).\n\n"
            "examples:\n"
            "  modelyard train tiny-llama ./chat.jsonl --method lora --max-steps 50 --watch\n"
            "  modelyard train tiny-llama --dataset ./pairs.jsonl --method dpo --epochs 2 \\\n"
            "      --output-name tiny-dpo\n"
            "  modelyard train tiny-llama ./alpaca.json --task summarization   # ROUGE on the eval split\n"
            "  modelyard train tiny-llama ./pairs.jsonl --method reward --output-name tiny-rm\n"
            "  modelyard train tiny-llama ./prompts.jsonl --method grpo --reward-model tiny-rm \\\n"
            "      --reward-function answer_match --num-generations 4\n\n"
            "methods: lora, qlora (CUDA), full and dpo, orpo, kto (unpaired rows: prompt, completion,\n"
            "label), reward (a reward model from preference pairs), grpo (RLHF on prompt-only rows).\n"
            "formats (detected): text, prompt/completion, chat (messages), preference, Alpaca\n"
            "(instruction/input/output), ShareGPT (conversations of from/value), unpaired preference,\n"
            "prompt only."
        ),
    )
    train.add_argument("base_model", metavar="BASE_MODEL", help="catalog model to fine-tune")
    train.add_argument("dataset", metavar="DATASET", nargs="?", help="training data (or --dataset)")
    train.add_argument("--dataset", dest="dataset_flag", metavar="DATASET", help="training data")
    train.add_argument("--dataset-format", choices=FORMATS, help="dataset format (default: detected)")
    train.add_argument("--method", choices=METHODS, default="lora", help="training method (default lora)")
    train.add_argument("--epochs", type=float, help="number of epochs")
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    train.add_argument("--learning-rate", type=float, help="peak learning rate")
    train.add_argument("--batch-size", type=int, help="per-device batch size")
    train.add_argument("--max-seq-length", type=int, help="longest tokenized row")
    train.add_argument(
        "--eval-split",
        type=float,
        help="fraction of rows held out for evaluation (default 0.1, at most 1000 rows; 0: none)",
    )
    train.add_argument(
        "--task", choices=TASKS, help="evaluate for a task: ROUGE (summarization), exact match/F1 (QA)"
    )
    train.add_argument(
        "--reward-function",
        action="append",
        default=[],
        choices=REWARD_FUNCTIONS,
        help="grpo: a built-in reward function (repeatable; summed)",
    )
    train.add_argument("--reward-model", default="", help="grpo: a catalog reward model scoring completions")
    train.add_argument("--num-generations", type=int, help="grpo: completions sampled per prompt (default 4)")
    train.add_argument("--max-completion-length", type=int, help="grpo: longest completion (default 64)")
    train.add_argument("--seed", type=int, help="random seed")
    train.add_argument("--lora-r", type=int, help="LoRA rank")
    train.add_argument("--lora-alpha", type=float, help="LoRA alpha")
    train.add_argument(
        "--output-name", default="", help="id of the model to register (default {base}-ft-{time})"
    )
    train.add_argument("--job-id", default="", help="id of the job (default: generated)")
    train.add_argument(
        "--label", action="append", default=[], type=label, help="KEY=VALUE label (repeatable)"
    )
    train.add_argument("--validate-only", action="store_true", help="check everything, create nothing")
    train.add_argument("--watch", action="store_true", help="follow the job until it ends")
    train.set_defaults(func=create_job)

    jobs = sub.add_parser(
        "jobs", help="list, follow, cancel and plot training jobs", description="Inspect training jobs."
    )
    commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")
    lst = commands.add_parser(
        "list",
        parents=[options],
        help="list jobs, newest first",
        formatter_class=HelpFormatter,
        description="List training jobs, newest first.",
        epilog=(
            "filter fields: state, base_model, method.\n\n"
            "examples:\n  modelyard jobs list --filter 'state = \"RUNNING\"'"
        ),
    )
    lst.add_argument("--filter", default="", help="AIP-160 filter")
    lst.add_argument("--limit", type=int, default=None, help="show at most this many jobs")
    lst.set_defaults(func=list_jobs)

    show = commands.add_parser(
        "show",
        parents=[options],
        help="show one job",
        description="Show a job: state, hyperparameters, progress.",
    )
    show.add_argument("job", metavar="JOB", help="job id or trainingJobs/ID")
    show.set_defaults(func=show_job)

    watch = commands.add_parser(
        "watch",
        parents=[options],
        help="follow a job until it ends",
        description=(
            "Follow a job's state changes, progress, evaluations and checkpoints until it ends.\n"
            "Exit code 0 when it SUCCEEDED, 1 when it FAILED or was CANCELLED. --json prints\n"
            "one WatchTrainingJobResponse per line."
        ),
        formatter_class=HelpFormatter,
    )
    watch.add_argument("job", metavar="JOB", help="job id or trainingJobs/ID")
    watch.set_defaults(func=watch_job)

    cancel = commands.add_parser(
        "cancel",
        parents=[options],
        help="cancel a queued or running job",
        description="Cancel a job; a running job stops within seconds and keeps its last checkpoint.",
    )
    cancel.add_argument("job", metavar="JOB", help="job id or trainingJobs/ID")
    cancel.set_defaults(func=cancel_job)

    plot = commands.add_parser(
        "plot",
        parents=[options],
        help="plot the loss and eval curves",
        formatter_class=HelpFormatter,
        description=(
            "Plot a job's training loss and eval loss by step, from the metric history the trainer\n"
            "keeps with the job (ListTrainingMetrics), so it works from any machine. Draws in the\n"
            "terminal by default; -o FILE.png writes a PNG (matplotlib when installed, else Pillow).\n"
            "Points this CLI recorded while watching and the job's readable checkpoint are added\n"
            "(older trainers keep no history). A running job is followed until it ends first with -o\n"
            '(unless --no-follow). --json prints {"output", "loss", "evalLoss"} with the points.'
        ),
        epilog="examples:\n  modelyard jobs plot my-job\n  modelyard jobs plot my-job -o loss.png",
    )
    plot.add_argument("job", metavar="JOB", help="job id or trainingJobs/ID")
    plot.add_argument("-o", "--output", type=Path, default=None, help="write a PNG here instead")
    plot.add_argument("--no-follow", action="store_true", help="plot what is known now, even if the job runs")
    plot.set_defaults(func=plot_job)


def create_job(args: argparse.Namespace) -> int:
    """`train`."""
    if args.dataset and args.dataset_flag and args.dataset != args.dataset_flag:
        print("modelyard train: error: give DATASET or --dataset, not both", file=sys.stderr)
        return EXIT_USAGE
    dataset = args.dataset or args.dataset_flag
    if not dataset:
        print("modelyard train: error: DATASET is required (positional or --dataset)", file=sys.stderr)
        return EXIT_USAGE
    with trainer_client(args) as client:
        job = client.create_training_job(
            args.base_model,
            local_or_as_is(dataset),
            method=args.method,
            dataset_format=args.dataset_format or 0,
            output_model_id=args.output_name,
            job_id=args.job_id,
            labels=parse_labels(args.label),
            validate_only=args.validate_only,
            epochs=args.epochs,
            max_steps=args.max_steps,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            max_seq_length=args.max_seq_length,
            eval_split=args.eval_split,
            seed=args.seed,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            task=args.task or "",
            grpo_reward_functions=args.reward_function or None,
            grpo_reward_model=args.reward_model or None,
            grpo_num_generations=args.num_generations,
            grpo_max_completion_length=args.max_completion_length,
        )
        response = pb.CreateTrainingJobResponse(job=job)
        if args.validate_only:
            if args.json:
                print_json(response)
            else:
                print(
                    f"valid: a {args.method} job on {job.base_model} with {job.dataset.source} can be created"
                )
            return EXIT_OK
        if not args.watch:
            if args.json:
                print_json(response)
            else:
                print(f"created {job.name} ({job_state(job)})")
                print(f"follow it with: modelyard jobs watch {job.name.removeprefix('trainingJobs/')}")
            return EXIT_OK
        if args.json:
            print_json_line(response)
        else:
            print(f"created {job.name} ({job_state(job)})", flush=True)
        final = follow(client, job.name, json_lines=args.json)
    return _exit_code(final)


def follow(client: TrainerClient, job: str, *, json_lines: bool, quiet: bool = False) -> pb.TrainingJob:
    """Watch `job` to its end, recording its loss history; returns the final job.

    Events are printed one per line on stdout (JSON Lines with `json_lines`);
    on a terminal, progress redraws one bar on stderr instead. `quiet` prints
    only the progress bar.
    """
    recorder = HistoryRecorder(job)
    status = StatusLine(log_updates=False)
    last: pb.TrainingJob | None = None
    try:
        for event in client.watch_training_job(job):
            recorder.add_event(event)
            last = event.job
            if json_lines:
                print_json_line(event)
            elif event.event_type == pb.TRAINING_EVENT_TYPE_PROGRESS and status.tty:
                status.update(f"{job} {progress_text(event.job)}", spin=False)
            elif not quiet:
                status.clear()
                print(f"{job}: {event_line(event)}", flush=True)
            if event.job.state in TERMINAL_STATES:
                break
    finally:
        status.close()
    return last if last is not None else client.get_training_job(job)


def _exit_code(job: pb.TrainingJob) -> int:
    return EXIT_OK if job.state == pb.TRAINING_JOB_STATE_SUCCEEDED else EXIT_JOB_FAILED


def list_jobs(args: argparse.Namespace) -> int:
    """`jobs list`."""
    with trainer_client(args) as client:
        jobs = list(islice(client.list_training_jobs(filter=args.filter), args.limit))
    if args.json:
        print_json(pb.ListTrainingJobsResponse(jobs=jobs))
    elif not jobs:
        print("no training jobs" + (f" match {args.filter}" if args.filter else ""))
    else:
        print(table(JOB_HEADERS, job_rows(jobs)))
    return EXIT_OK


def show_job(args: argparse.Namespace) -> int:
    """`jobs show`."""
    with trainer_client(args) as client:
        job = client.get_training_job(args.job)
    if args.json:
        print_json(pb.GetTrainingJobResponse(job=job))
    else:
        print(job_block(job))
    return EXIT_OK


def watch_job(args: argparse.Namespace) -> int:
    """`jobs watch`: exit 0 when the job SUCCEEDED."""
    with trainer_client(args) as client:
        final = follow(client, job_name(args.job), json_lines=args.json)
    if not args.json:
        print(
            f"{final.name}: {job_state(final)}" + (f" -> {final.output_model}" if final.output_model else "")
        )
    return _exit_code(final)


def cancel_job(args: argparse.Namespace) -> int:
    """`jobs cancel`."""
    with trainer_client(args) as client:
        job = client.cancel_training_job(args.job)
    if args.json:
        print_json(pb.CancelTrainingJobResponse(job=job))
    else:
        print(f"{job.name}: {job_state(job)}")
    return EXIT_OK


def plot_job(args: argparse.Namespace) -> int:
    """`jobs plot`."""
    name = job_name(args.job)
    with trainer_client(args) as client:
        job = client.get_training_job(name)
        if job.state not in TERMINAL_STATES and not args.no_follow and args.output is not None:
            print(f"{name} is {job_state(job)}: following it until it ends", file=sys.stderr)
            job = follow(client, name, json_lines=False, quiet=True)
        try:
            server = history_from_points(client.list_training_metrics(name))
        except ModelyardRpcError as error:
            if error.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
            server = None  # a trainer that keeps no history: what this machine knows
    recorder = HistoryRecorder(name)  # re-read: includes what was just followed
    history = recorder.history
    history.merge(load_trainer_state(job.checkpoint_path))
    if server is not None:
        history.merge(server)
    if not history:
        print(
            f"error: no loss history for {name} yet: the job has logged no step ({job_state(job)})",
            file=sys.stderr,
        )
        return EXIT_JOB_FAILED
    if args.output is None:
        if args.json:
            print(json.dumps({"output": "", **history.as_json()}, indent=2))
        else:
            print(render_terminal(history, f"{name} ({job_state(job)})"))
        return EXIT_OK
    try:
        render_png(history, args.output, f"{name} ({job_state(job)})")
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_JOB_FAILED
    if args.json:
        print(json.dumps({"output": str(args.output), **history.as_json()}, indent=2))
    else:
        print(
            f"wrote {args.output} ({len(history.loss)} training loss point(s), "
            f"{len(history.eval_loss)} eval loss point(s))"
        )
    return EXIT_OK
