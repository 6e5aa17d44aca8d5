"""The whole loop, end to end: three real server processes, driven through the public clients.

`suite` starts `python -m catalog_service`, `python -m trainer_service` and
`python -m inference_service` as processes (tests.helpers.ServerProcess) with
their data under a temporary folder; the trainer and the inference worker find
the catalog through MODELYARD_CATALOG_ADDRESS, and inference serves with vLLM
(a 64 MiB KV cache, eager mode). The loop test then builds a tiny Llama,
imports it, trains a LoRA adapter on the dataset bundled with the CLI, and
generates with and without it on the worker the catalog routes to.

`modelyard demo` runs once too, as a user runs it: the console script in a
subprocess, starting its own suite. It runs first, before `suite` starts, so
the two never compete for the CPU.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import grpc
import pytest

from clients import cli
from clients.catalog import CatalogClient
from clients.inference import InferenceClient
from clients.routing import RoutedInferenceClient
from clients.trainer import TrainerClient
from modelyard.catalog.v1 import model_pb2, worker_pb2
from modelyard.trainer.v1 import trainer_service_pb2 as trainer_pb
from tests.helpers import ServerProcess, free_port, tool

KV_CACHE_BYTES = 64 * 1024 * 1024
STEPS = 20
LEARNING_RATE = 5e-3
PROMPT = "What is the capital of France?"
ADDRESS_VARIABLES = ("MODELYARD_CATALOG_ADDRESS", "MODELYARD_TRAINER_ADDRESS", "MODELYARD_INFERENCE_ADDRESS")


def _clean_environment(data_dir: Path) -> dict[str, str]:
    """This process's environment without the addresses a developer may have exported."""
    env = {k: v for k, v in os.environ.items() if k not in ADDRESS_VARIABLES}
    env["MODELYARD_DATA_DIR"] = str(data_dir)  # the CLI's own files (job history)
    env["VLLM_LOGGING_LEVEL"] = "WARNING"
    return env


# ---- `modelyard demo`: runs first, alone ---------------------------------------------------------------


@pytest.mark.slow
def test_modelyard_demo_runs_the_loop_and_stops_its_suite(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    started = subprocess.run(
        [tool("modelyard"), "demo", "--data-dir", str(data_dir), "--steps", "8", "--json"],
        env=_clean_environment(tmp_path / "cli-home"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    out = started.stderr  # the narration; --json prints the summary on stdout
    assert started.returncode == 0, started.stdout + out

    # The narration: every step, with the command a user would type and its timing.
    for number, title in enumerate(
        ["Start the suite", "Build a tiny model", "Import it into the catalog", "Fine-tune a LoRA adapter",
         "Serve the model and the adapter", "Compare the model and the adapter"],
        start=1,
    ):  # fmt: skip
        assert f"[{number}/6] {title}" in out
    assert out.count("done in ") == 6
    assert "$ modelyard models import ./tiny-llama" in out
    assert re.search(r"\$ modelyard train tiny-llama \./chat\.jsonl --method lora --max-steps 8 ", out)
    assert "registered models/tiny-llama-pirate, parent models/tiny-llama" in out
    assert re.search(r"models/tiny-llama-pirate -> workers/\S+ at 127\.0\.0\.1:\d+ \(vllm\)", out)
    assert re.search(r"loaded models/tiny-llama in .* \(vllm, context 256\)", out)
    assert "hot-loaded models/tiny-llama-pirate" in out
    assert f"user: {PROMPT}" in out
    assert re.search(r"\[models/tiny-llama\]\s+\| \[models/tiny-llama-pirate\]", out)
    assert "Demo finished in " in out
    summary = json.loads(started.stdout)
    assert summary["baseModel"] == "models/tiny-llama"
    assert summary["adapter"] == "models/tiny-llama-pirate"
    assert summary["trainingJob"].startswith("trainingJobs/")
    assert [c["prompt"] for c in summary["comparisons"]] == [PROMPT, "What should I eat for breakfast?"]
    assert all(c["base"] and c["adapter"] for c in summary["comparisons"])

    # The suite it started is gone: each process and its port.
    children = [
        (int(pid), address)
        for address, pid in re.findall(r"^\s+\w+\s+(127\.0\.0\.1:\d+)\s+\(pid (\d+),", out, re.M)
    ]
    assert len(children) == 3
    for pid, address in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=1)
    assert (data_dir / "logs" / "inference.log").is_file()  # --data-dir is the user's: kept


def test_demo_wants_all_three_addresses_or_none(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ADDRESS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["demo", "--catalog", "localhost:50051"]) == 2
    assert "--trainer, --inference missing" in capsys.readouterr().err


def test_demo_against_a_suite_that_does_not_answer(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ADDRESS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    dead = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    code = cli.main(
        [
            "demo",
            "--catalog",
            dead[0],
            "--trainer",
            dead[1],
            "--inference",
            dead[2],
            "--data-dir",
            str(tmp_path),
        ]
    )
    assert code == 3
    err = capsys.readouterr().err
    assert f"no healthy service at catalog at {dead[0]}" in err
    assert "modelyard serve all" in err


# ---- three real processes, driven through the clients ---------------------------------------------


@dataclass
class Suite:
    """The three services as processes, and the folder their files live in."""

    catalog: ServerProcess
    trainer: ServerProcess
    inference: ServerProcess
    root: Path
    tiny_llama: Path
    dataset: Path


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    """Catalog, trainer and inference (vLLM) as real processes; a tiny Llama and the demo dataset."""
    from tinymodels.llm import build_llm

    root = tmp_path_factory.mktemp("e2e")
    logs = root / "logs"
    logs.mkdir()
    common = {**_clean_environment(root / "cli-home"), "MODELYARD_DRAIN_SECONDS": "0"}
    catalog = ServerProcess(
        "catalog_service",
        ["--data-dir", str(root / "catalog")],
        env={**common, "MODELYARD_CATALOG_ALLOWED_ROOTS": str(root)},
        log_path=logs / "catalog.log",
    )
    workers = {**common, "MODELYARD_CATALOG_ADDRESS": catalog.address}
    trainer = ServerProcess(
        "trainer_service",
        ["--data-dir", str(root / "trainer")],
        env={
            **workers,
            "MODELYARD_TRAINER_DATASET_ROOTS": str(root),
            "MODELYARD_TRAINER_POLL_SECONDS": "0.5",
        },
        log_path=logs / "trainer.log",
    )
    inference = ServerProcess(
        "inference_service",
        ["--data-dir", str(root / "inference")],
        env={
            **workers,
            "MODELYARD_INFERENCE_ENGINE": "vllm",
            "MODELYARD_INFERENCE_KV_CACHE_BYTES": str(KV_CACHE_BYTES),
            "MODELYARD_INFERENCE_ENFORCE_EAGER": "true",
            "MODELYARD_INFERENCE_DTYPE": "float32",
        },
        log_path=logs / "inference.log",
    )
    processes = [inference, trainer, catalog]
    try:
        tiny_llama = build_llm(
            root / "models" / "tiny-llama", arch="llama", dtype="float32"
        )  # while they start
        dataset = root / "data" / "chat.jsonl"
        dataset.parent.mkdir()
        dataset.write_bytes(resources.files("clients.demo_data").joinpath("chat.jsonl").read_bytes())
        for process in processes:
            process.wait_serving(timeout=180)
        yield Suite(catalog, trainer, inference, root, tiny_llama, dataset)
    finally:
        for process in processes:
            process.terminate(signal.SIGTERM)  # all at once: they shut down in parallel
        for process in processes:
            process.stop(timeout=30)


def _eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_import_train_route_and_generate_through_the_clients(suite: Suite) -> None:
    with CatalogClient(suite.catalog.address) as catalog, TrainerClient(suite.trainer.address) as trainer:
        # Import: the catalog reads the folder, detects an LLM and its config.
        base = catalog.import_model(str(suite.tiny_llama), model_id="tiny-llama")
        assert base.state == model_pb2.MODEL_STATE_READY
        assert base.llm.architecture == "LlamaForCausalLM"
        assert base.llm.tokenizer.chat_template

        # Train: a LoRA job, followed with WatchTrainingJob to its end.
        job = trainer.create_training_job(
            base.name,
            str(suite.dataset),
            method="lora",
            max_steps=STEPS,
            learning_rate=LEARNING_RATE,
            output_model_id="tiny-llama-pirate",
        )
        assert job.state == trainer_pb.TRAINING_JOB_STATE_QUEUED
        events = []
        for event in trainer.watch_training_job(job.name, timeout=300):
            events.append(event)
            if event.job.state in (
                trainer_pb.TRAINING_JOB_STATE_SUCCEEDED,
                trainer_pb.TRAINING_JOB_STATE_FAILED,
                trainer_pb.TRAINING_JOB_STATE_CANCELLED,
            ):
                break
        final = events[-1].job
        assert final.state == trainer_pb.TRAINING_JOB_STATE_SUCCEEDED, (final.error, suite.trainer.log())
        states = [e.job.state for e in events if e.event_type == trainer_pb.TRAINING_EVENT_TYPE_STATE_CHANGED]
        assert trainer_pb.TRAINING_JOB_STATE_RUNNING in states
        losses = [
            e.job.progress.loss
            for e in events
            if e.event_type == trainer_pb.TRAINING_EVENT_TYPE_PROGRESS and e.job.progress.HasField("loss")
        ]
        assert losses, "the watch streamed no training loss"
        assert final.progress.step == STEPS
        assert final.output_model == "models/tiny-llama-pirate"

        # The fine-tune is in the catalog, a child of the base.
        adapter = catalog.get_model(final.output_model)
        assert adapter.parent == base.name
        assert adapter.source.fine_tune.training_job == job.name
        assert adapter.llm.adapter.rank == 8
        lineage = catalog.get_lineage(adapter.name)
        assert [m.name for m in lineage.ancestors] == [base.name]
        assert adapter.name in [m.name for m in catalog.get_lineage(base.name).descendants]

        # Route: FindWorkers sends the adapter to the vLLM worker process.
        inference_port = suite.inference.address.rsplit(":", 1)[1]
        _eventually(
            lambda: any(
                w.address.endswith(f":{inference_port}")
                for w in catalog.list_workers(filter='role = "INFERENCE"')
            ),
            timeout=30,
            what="the inference worker to register",
        )
        with InferenceClient.for_model(adapter.name, catalog=catalog, timeout=120) as llm:
            assert llm.worker is not None
            assert llm.address.endswith(f":{inference_port}")
            assert llm.worker.capabilities.engine == "vllm"

            # Generate greedily with the base and with the adapter: the adapter changes the text.
            options = {"max_tokens": 16, "temperature": 0.0, "timeout": 300.0}
            plain = llm.generate(base.name, PROMPT, **options)  # type: ignore[arg-type]
            tuned = llm.generate(base.name, PROMPT, adapter=adapter.name, **options)  # type: ignore[arg-type]
            assert plain.usage.completion_tokens > 0 and tuned.usage.completion_tokens > 0
            assert plain.completions[0].token_ids != tuned.completions[0].token_ids

            loaded = {m.model: m for m in llm.list_loaded_models()}
            assert base.name in loaded and adapter.name in loaded[base.name].adapters
            assert loaded[base.name].engine == "vllm"

        # The routed client reaches the same worker and answers a chat with the adapter.
        with RoutedInferenceClient(suite.catalog.address, timeout=120) as routed:
            reply = routed.chat(
                base.name, [("user", PROMPT)], adapter=adapter.name, max_tokens=8, temperature=0.0
            )
            assert routed.last_address is not None and routed.last_address.endswith(f":{inference_port}")
            assert reply.choices[0].message.role == "assistant"

        # Both workers are registered, with their roles and engines.
        workers = {w.name: w for w in catalog.list_workers()}
        roles = {(w.role, w.capabilities.engine) for w in workers.values()}
        assert (worker_pb2.WORKER_ROLE_INFERENCE, "vllm") in roles
        assert any(role == worker_pb2.WORKER_ROLE_TRAINING for role, _ in roles)
        assert llm.worker.name in workers
        assert workers[llm.worker.name].state == worker_pb2.WORKER_STATE_HEALTHY
