"""The interface every training method implements, and what the methods share.

A `Strategy` checks the method's preconditions on this machine (`validate`)
and trains (`train`): it builds the model and TRL trainer for the method, runs
it with the job's callbacks (progress, cancel, checkpoints), and saves the
result to `ctx.output_dir` as safetensors with its config and tokenizer. The
worker process runs strategies; the server only calls `validate`.

Facts about this stack (transformers 5, TRL 1.16) that the shared helpers encode:
TRL's configs default to `bf16=True` and `gradient_checkpointing=True`, both set
explicitly here; `SFTConfig(max_length=)`; `use_cpu=True` off CUDA;
`eval_strategy`; `processing_class=`; resuming passes the path of the last
checkpoint whose `trainer_state.json` exists (written last, so it marks a
complete checkpoint).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from trainer_service.datasets import DatasetFormat, Method, tokenize_sft_row
from trainer_service.hyperparams import ALL_LINEAR, Hyperparams

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


class StopRequest:
    """Why a running job should stop early, read from the job's control file.

    The server writes `cancel` (a user cancelled) or `preempt` (the trainer is
    shutting down; the job resumes elsewhere) into the file; the training
    callback checks it after every optimizer step.
    """

    def __init__(self, control_file: Path | None) -> None:
        self.control_file = control_file
        self.reason: str | None = None

    def check(self) -> str | None:
        """The stop reason (`cancel` or `preempt`), or None to go on.

        In a multi-process (DDP) run every rank calls this after the same
        steps and rank 0's reading decides for all, so they stop together.
        """
        if self.reason is None:
            from trainer_service.ddp import agreed_stop

            self.reason = agreed_stop(self._read())
        return self.reason

    def _read(self) -> str | None:
        if self.control_file is None:
            return None
        try:
            word = self.control_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return word if word in ("cancel", "preempt") else None


@dataclass
class TrainContext:
    """Everything a strategy needs to train one job."""

    job_id: str
    method: Method
    base_model_path: Path
    rows: list[dict[str, Any]]
    dataset_format: DatasetFormat
    hyper: Hyperparams
    output_dir: Path
    checkpoints_dir: Path
    resume_from: Path | None = None
    eval_rows: list[dict[str, Any]] = field(default_factory=list)
    stop: StopRequest = field(default_factory=lambda: StopRequest(None))
    allow_remote_code: bool = False
    task: str = ""
    """`SUMMARIZATION`, `QUESTION_ANSWERING` or empty (see `trainer_service.evaluation`)."""
    reward_model_path: Path | None = None
    """GRPO: the folder of the catalog reward model scoring completions."""


@dataclass
class TrainResult:
    """What training produced: the saved output (None when stopped early) and final metrics."""

    output_dir: Path | None
    stopped: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class Strategy(ABC):
    """One training method."""

    method: ClassVar[Method]
    produces_adapter: ClassVar[bool] = True

    def validate(self) -> None:
        """Raise FailedPrecondition when this machine cannot run the method (default: it can)."""
        return None

    @abstractmethod
    def train(self, ctx: TrainContext, callbacks: Sequence[Any]) -> TrainResult:
        """Train, save to `ctx.output_dir` unless stopped early, and return the result."""

    def check_output(self, output_dir: Path, base_model_path: Path) -> str:
        """The post-training check of the saved output (default: it loads and generates); a sample."""
        return check_output(output_dir, base_model_path, adapter=self.produces_adapter)


# --------------------------------------------------------------------------- device and loading


@dataclass(frozen=True)
class Device:
    """Where training runs and in which precision."""

    cuda: bool
    bf16: bool

    @property
    def dtype_name(self) -> str:
        """Weights dtype to load the model in."""
        return "bfloat16" if self.bf16 else "float32"


def detect_device() -> Device:
    """CUDA with bf16 when available; else CPU in float32 (TRL's bf16 default is turned off)."""
    import torch

    cuda = torch.cuda.is_available()
    return Device(cuda=cuda, bf16=cuda and torch.cuda.is_bf16_supported())


def load_tokenizer(path: Path, *, allow_remote_code: bool = False) -> Any:
    """The model's tokenizer, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=allow_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path, device: Device, *, allow_remote_code: bool = False, **kwargs: Any) -> Any:
    """The causal LM at `path` in the device's dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=getattr(torch, device.dtype_name), trust_remote_code=allow_remote_code, **kwargs
    )


def lora_config(
    hyper: Hyperparams, *, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None
) -> Any:
    """The peft LoRA config of a job (`all-linear` targets every linear layer but the LM head)."""
    from peft import LoraConfig

    targets: str | list[str] = hyper.lora_target_modules
    if list(targets) == [ALL_LINEAR]:
        targets = ALL_LINEAR
    return LoraConfig(
        r=hyper.lora_r,
        lora_alpha=hyper.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
        lora_dropout=hyper.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def sft_dataset(rows: Sequence[dict[str, Any]], fmt: DatasetFormat, tokenizer: Any) -> Any:
    """Rows tokenized as the validation measured them: `input_ids` and `labels` (-100 = no loss)."""
    from datasets import Dataset

    tokenized = [tokenize_sft_row(row, fmt, tokenizer) for row in rows]
    return Dataset.from_list([{"input_ids": t.input_ids, "labels": t.labels} for t in tokenized])


def common_arguments(ctx: TrainContext, device: Device, *, has_eval: bool) -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig and DPOConfig."""
    h = ctx.hyper
    arguments: dict[str, Any] = {
        "output_dir": str(ctx.checkpoints_dir),
        "num_train_epochs": h.epochs,
        "max_steps": h.max_steps if h.max_steps is not None else -1,
        "learning_rate": h.learning_rate,
        "lr_scheduler_type": h.lr_scheduler,
        "warmup_steps": h.warmup_ratio,
        "per_device_train_batch_size": h.batch_size,
        "per_device_eval_batch_size": h.batch_size,
        "gradient_accumulation_steps": h.gradient_accumulation_steps,
        "weight_decay": h.weight_decay,
        "seed": h.seed,
        "data_seed": h.seed,
        "max_length": h.max_seq_length,
        "logging_strategy": "steps",
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": h.save_steps,
        "save_total_limit": 2,
        "eval_strategy": "steps" if has_eval and h.eval_steps else "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "include_num_input_tokens_seen": "non_padding",
        "use_cpu": not device.cuda,
        "bf16": device.bf16,
        "fp16": False,
        "gradient_checkpointing": False,
    }
    if has_eval and h.eval_steps:
        arguments["eval_steps"] = h.eval_steps
    return arguments


def find_complete_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The highest `checkpoint-N` folder that has its `trainer_state.json` (written last)."""
    if not checkpoints_dir.is_dir():
        return None
    found: list[tuple[int, Path]] = []
    for child in checkpoints_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir() and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def run_trainer(trainer: Any, ctx: TrainContext, *, perplexity: bool) -> TrainResult:
    """Train (resuming when asked), evaluate at the end when there is eval data, return the metrics."""
    output = trainer.train(resume_from_checkpoint=str(ctx.resume_from) if ctx.resume_from else None)
    metrics: dict[str, float] = {
        key: float(value) for key, value in (output.metrics or {}).items() if isinstance(value, int | float)
    }
    stopped = ctx.stop.check()
    if stopped:
        return TrainResult(None, stopped, metrics)
    if trainer.eval_dataset is not None:
        evaluation = trainer.evaluate()  # logged: the callbacks report it as an EVAL event
        metrics.update({k: float(v) for k, v in evaluation.items() if isinstance(v, int | float)})
        if perplexity and "eval_loss" in evaluation:
            metrics["eval_perplexity"] = safe_exp(float(evaluation["eval_loss"]))
        if ctx.task and ctx.eval_rows:
            from trainer_service.evaluation import task_metrics

            scores = task_metrics(
                ctx.task, trainer.model, trainer.processing_class, ctx.eval_rows, ctx.dataset_format
            )
            if scores:
                trainer.log(dict(scores))  # an EVAL event with the task metrics, kept in log_history
                metrics.update(scores)
    return TrainResult(ctx.output_dir, None, metrics)


def safe_exp(value: float) -> float:
    """exp(value), capped so a huge loss gives a large finite perplexity."""
    return math.exp(min(value, 80.0))


def copy_tokenizer_files(source: Path, destination: Path) -> None:
    """Copy the tokenizer files the base model has (and the output lacks) to `destination`."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and not (destination / name).exists():
            shutil.copy2(source / name, destination / name)


def write_training_record(ctx: TrainContext, metrics: dict[str, float]) -> None:
    """`training_config.json` (method, hyperparameters, dataset) and `training_metrics.json` in the output."""
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "job": f"trainingJobs/{ctx.job_id}",
        "method": ctx.method.value,
        "dataset_format": ctx.dataset_format.value,
        "train_rows": len(ctx.rows),
        "eval_rows": len(ctx.eval_rows),
        "hyperparameters": ctx.hyper.to_dict(),
    }
    (ctx.output_dir / "training_config.json").write_text(
        json.dumps(record, indent=2) + "\n", encoding="utf-8"
    )
    (ctx.output_dir / "training_metrics.json").write_text(
        json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def check_output(output_dir: Path, base_model_path: Path, *, adapter: bool) -> str:
    """The post-training check: files present, JSON parses, the model loads and generates.

    Returns the generated text of a short greedy generation; raises
    `OutputCheckError` naming what is wrong.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    required = ["adapter_config.json", "adapter_model.safetensors"] if adapter else ["config.json"]
    missing = [name for name in required if not (output_dir / name).is_file()]
    if not adapter and not any(output_dir.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise OutputCheckError(f"missing files in the output: {', '.join(missing)}")
    for json_file in output_dir.glob("*.json"):
        try:
            json.loads(json_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise OutputCheckError(f"{json_file.name} is not valid JSON: {error}") from error
    device = detect_device()
    dtype = getattr(torch, device.dtype_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(output_dir))
        if adapter:
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(str(base_model_path), dtype=dtype)
            model: Any = PeftModel.from_pretrained(base, str(output_dir))
        else:
            model = AutoModelForCausalLM.from_pretrained(str(output_dir), dtype=dtype)
        if device.cuda:
            model = model.to("cuda")
        model.eval()
        inputs = tokenizer("Hello", return_tensors="pt").to(model.device)
        with torch.no_grad():
            logits = model(**inputs).logits
            generated = model.generate(
                **inputs,
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else tokenizer.eos_token_id,
            )
    except Exception as error:
        raise OutputCheckError(f"the trained model does not load and generate: {error}") from error
    if not bool(torch.isfinite(logits).all()):
        raise OutputCheckError("the trained model computes non-finite logits (NaN or inf weights)")
    return str(tokenizer.decode(generated[0], skip_special_tokens=True))


class OutputCheckError(Exception):
    """The saved output failed the post-training check."""
