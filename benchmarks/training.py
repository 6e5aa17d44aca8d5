"""Training throughput through the trainer service next to the same peft loop run directly.

    .venv/bin/python benchmarks/training.py [--rounds 3] [--steps 40] [--batch-size 4] [--hidden 256]

Builds a small Llama (`tinymodels.llm.build_llm`) and a chat dataset, then per
round, alternating so machine noise hits both alike:

- direct: TRL's SFTTrainer with a peft LoRA adapter in this process, on the
  same tokenized rows with the same hyperparameters (logging every step, no
  checkpoints);
- service: a catalog and a trainer served on free ports; a LoRA job created
  through `AsyncTrainerClient` and followed to SUCCEEDED. The samples/s is
  the one the worker's Trainer measured (its `training_metrics.json`); the
  end-to-end time (create -> SUCCEEDED, with the worker's start, the
  post-training check and the catalog registration) is printed next to it.

Prints each round and the median ratio service / direct; target >= 0.95. Then one
line per alignment method (`--methods`, default orpo,kto,reward,grpo): a job of
`--method-steps` steps through the service on small preference, unpaired and
prompt-only rows (GRPO rewarded by the reward model the REWARD job just made plus
`repetition_penalty`), with the worker's samples/s and the end-to-end time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from catalog_service.app import CatalogApp  # noqa: E402
from catalog_service.settings import CatalogSettings  # noqa: E402
from clients.catalog import AsyncCatalogClient  # noqa: E402
from clients.trainer import AsyncTrainerClient  # noqa: E402
from modelyard.trainer.v1 import trainer_service_pb2 as pb  # noqa: E402
from server_kit.server import GrpcServer  # noqa: E402
from trainer_service.app import TrainerApp  # noqa: E402
from trainer_service.settings import TrainerSettings  # noqa: E402

LEARNING_RATE = 2e-4


def chat_rows(n: int) -> list[dict[str, Any]]:
    """Arithmetic conversations of a few dozen tokens each."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i + 1}? Answer in one sentence please."},
                {
                    "role": "assistant",
                    "content": f"The sum of {i} and {i + 1} is {2 * i + 1}, a small number.",
                },
            ]
        }
        for i in range(n)
    ]


def direct_round(model_dir: Path, rows: list[dict[str, Any]], steps: int, batch: int, out: Path) -> float:
    """Samples/s of SFTTrainer + peft LoRA run here, with the service's settings."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from trainer_service.datasets import DatasetFormat
    from trainer_service.strategies.base import load_tokenizer, sft_dataset

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=LEARNING_RATE,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        gradient_checkpointing=False,
        max_length=512,
        seed=42,
    )
    peft_config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(rows, DatasetFormat.CHAT, tokenizer),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    return float(trainer.train().metrics["train_samples_per_second"])


async def service_round(
    trainer: str, dataset: Path, steps: int, batch: int, data_dir: Path
) -> tuple[float, float]:
    """(samples/s measured by the worker, end-to-end seconds) of one LoRA job through the service."""
    async with AsyncTrainerClient(trainer) as client:
        started = time.perf_counter()
        job = await client.create_training_job(
            "models/bench-llama", str(dataset), method="lora", max_steps=steps, batch_size=batch,
            learning_rate=LEARNING_RATE, save_steps=1_000_000,
        )  # fmt: skip
        final = await client.wait_training_job(job.name, timeout=3600)
        elapsed = time.perf_counter() - started
    if final.state != pb.TRAINING_JOB_STATE_SUCCEEDED:
        raise SystemExit(f"job {job.name} ended {final.state}: {final.error}")
    metrics_file = (
        data_dir / "jobs" / job.name.removeprefix("trainingJobs/") / "output" / "training_metrics.json"
    )
    metrics = json.loads(metrics_file.read_text())
    return float(metrics["train_samples_per_second"]), elapsed


def method_rows(method: str, n: int) -> list[dict[str, Any]]:
    """Rows for an alignment method: preference pairs, unpaired completions or prompts."""
    if method == "kto":
        return [
            {"prompt": f"Is {i} even? ", "completion": "yes." if i % 2 == 0 else "no.", "label": i % 2 == 0}
            for i in range(n)
        ]
    if method == "grpo":
        return [{"prompt": f"What is {i} plus {i}? "} for i in range(n)]
    return [
        {"prompt": f"Is {i} even? ", "chosen": "yes it is.", "rejected": f"no, {i} is odd."} for i in range(n)
    ]


async def method_round(
    trainer: str, root: Path, method: str, steps: int, batch: int, data_dir: Path
) -> tuple[float, float]:
    """(samples/s measured by the worker, end-to-end seconds) of one `method` job through the service."""
    dataset = root / f"{method}.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in method_rows(method, 64)))
    options: dict[str, Any] = {}
    if method == "grpo":
        options = {
            "grpo_reward_functions": ["repetition_penalty"],
            "grpo_reward_model": "bench-rm",
            "grpo_num_generations": 2,
            "grpo_max_completion_length": 16,
        }
    async with AsyncTrainerClient(trainer) as client:
        started = time.perf_counter()
        job = await client.create_training_job(
            "models/bench-llama", str(dataset), method=method, max_steps=steps, batch_size=batch,
            learning_rate=LEARNING_RATE, save_steps=1_000_000,
            output_model_id="bench-rm" if method == "reward" else "", **options,
        )  # fmt: skip
        final = await client.wait_training_job(job.name, timeout=3600)
        elapsed = time.perf_counter() - started
    if final.state != pb.TRAINING_JOB_STATE_SUCCEEDED:
        raise SystemExit(f"{method} job {job.name} ended {final.state}: {final.error}")
    output = data_dir / "jobs" / job.name.removeprefix("trainingJobs/") / "output"
    metrics = json.loads((output / "training_metrics.json").read_text())
    return float(metrics["train_samples_per_second"]), elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--methods", default="orpo,kto,reward,grpo", help="alignment methods ('' for none)")
    parser.add_argument("--method-steps", type=int, default=10)
    options = parser.parse_args()

    from tinymodels.llm import build_llm

    with tempfile.TemporaryDirectory(prefix="modelyard-bench-") as tmp:
        root = Path(tmp)
        model_dir = build_llm(
            root / "bench-llama", "llama", hidden_size=options.hidden, num_layers=options.layers,
            intermediate_size=options.hidden * 2,
        )  # fmt: skip
        rows = chat_rows(options.rows)
        dataset = root / "chat.jsonl"
        dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))

        catalog = GrpcServer(
            CatalogApp(CatalogSettings(data_dir=root / "catalog", allowed_roots=[root])), "127.0.0.1:0"
        )
        await catalog.start()
        async with AsyncCatalogClient(catalog.target) as client:
            await client.import_model(str(model_dir), model_id="bench-llama")
        trainer_dir = root / "trainer"
        trainer = GrpcServer(
            TrainerApp(
                TrainerSettings(
                    data_dir=trainer_dir,
                    catalog_address=catalog.target,
                    dataset_roots=[root],
                    poll_seconds=0.2,
                )
            ),
            "127.0.0.1:0",
        )
        await trainer.start()
        print(
            f"model: llama hidden {options.hidden} x {options.layers} layers; {options.rows} chat rows; "
            f"{options.steps} steps of batch {options.batch_size}; LoRA r=8 on all linear layers"
        )
        direct: list[float] = []
        service: list[float] = []
        try:
            for index in range(options.rounds):
                d = await asyncio.to_thread(
                    direct_round, model_dir, rows, options.steps, options.batch_size, root / f"direct-{index}"
                )
                s, wall = await service_round(
                    trainer.target, dataset, options.steps, options.batch_size, trainer_dir
                )
                direct.append(d)
                service.append(s)
                print(
                    f"round {index + 1}: direct {d:7.2f} samples/s | service {s:7.2f} samples/s "
                    f"({s / d:.3f}x) | service end to end {wall:6.1f} s"
                )
            for method in [m.strip() for m in options.methods.split(",") if m.strip()]:
                batch = 2 if method == "grpo" else options.batch_size
                rate, wall = await method_round(
                    trainer.target, root, method, options.method_steps, batch, trainer_dir
                )
                print(
                    f"method {method:6}: service {rate:7.2f} samples/s, "
                    f"{options.method_steps} steps of batch {batch}, end to end {wall:6.1f} s"
                )
        finally:
            await trainer.stop(0)
            await catalog.stop(0)
        ratios = [s / d for s, d in zip(service, direct, strict=True)]
        print(
            f"median: direct {statistics.median(direct):.2f} samples/s, "
            f"service {statistics.median(service):.2f} samples/s, "
            f"ratio {statistics.median(ratios):.3f}x (spread {min(ratios):.3f}-{max(ratios):.3f}); "
            "target >= 0.95x"
        )


if __name__ == "__main__":
    asyncio.run(main())
