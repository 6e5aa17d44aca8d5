"""The Python examples of docs/clients.md run, in order, against the real services.

The test starts the real catalog, trainer and inference services (in this
process, on free ports; inference with the transformers engine, which starts
fastest here), builds `./tiny-llama` as the docs tell the reader to, and
executes every ```python block of the document in document order, each in a
fresh namespace. The only change made to the blocks is the addresses:
`localhost:50051/50052/50053` become the test servers' ports.
"""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from tests.clients.conftest import Result
from tests.clients.doubles import ServerThread
from tests.helpers import ROOT, free_port

DOC = ROOT / "docs" / "clients.md"

pytestmark = pytest.mark.slow


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        blocks.append((text.count("\n", 0, match.start()) + 2, match.group(1)))
    return blocks


def test_the_document_has_examples_for_every_service() -> None:
    code = "\n".join(block for _, block in python_blocks(DOC.read_text()))
    for name in ("CatalogClient", "AsyncCatalogClient", "TrainerClient", "AsyncTrainerClient"):
        assert f"import {name}" in code
    for name in ("InferenceClient", "AsyncRoutedInferenceClient"):
        assert name in code
    assert code.count("asyncio.run(main())") >= 3


@dataclass
class Stack:
    """Addresses of the running services, and the folder holding ./tiny-llama."""

    catalog: str
    trainer: str
    inference: str
    folder: Path


@pytest.fixture(scope="module")
def stack(server_thread: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The real catalog, trainer and inference services, registered with each other."""
    from inference_service.app import InferenceApp
    from inference_service.settings import InferenceSettings
    from tinymodels.llm import build_llm
    from trainer_service.app import TrainerApp
    from trainer_service.settings import TrainerSettings

    folder = tmp_path_factory.mktemp("stack")
    build_llm(folder / "tiny-llama")  # `python -m tinymodels llm ./tiny-llama`
    catalog = server_thread.serve(
        CatalogApp(
            CatalogSettings(data_dir=folder / "catalog", allowed_roots=[folder], heartbeat_ttl_seconds=60)
        )
    )
    servers = [catalog]
    trainer_port, inference_port = free_port(), free_port()
    trainer = server_thread.serve(
        TrainerApp(
            TrainerSettings(
                data_dir=folder / "trainer",
                catalog_address=catalog.target,
                advertise_address=f"127.0.0.1:{trainer_port}",
                dataset_roots=[folder],
                poll_seconds=0.5,
            )
        ),
        address=f"127.0.0.1:{trainer_port}",
    )
    servers.append(trainer)
    inference = server_thread.serve(
        InferenceApp(
            InferenceSettings(
                data_dir=folder / "inference",
                catalog_address=catalog.target,
                advertise_address=f"127.0.0.1:{inference_port}",
                engine="transformers",
            )
        ),
        address=f"127.0.0.1:{inference_port}",
    )
    servers.append(inference)
    yield Stack(catalog.target, trainer.target, inference.target, folder)
    for server in reversed(servers):
        server_thread.stop(server)


def test_python_examples_run_against_the_services(
    stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(stack.folder)
    replacements = {
        "localhost:50051": stack.catalog,
        "localhost:50052": stack.trainer,
        "localhost:50053": stack.inference,
    }
    outputs = []
    for line, block in python_blocks(DOC.read_text()):
        code = block
        for old, new in replacements.items():
            code = code.replace(old, new)
        capsys.readouterr()
        exec(compile(code, f"{DOC}:{line}", "exec"), {"__name__": "__main__"})
        outputs.append((line, capsys.readouterr().out))

    printed = "\n".join(out for _, out in outputs)
    assert "models/tiny-llama LlamaForCausalLM 256" in printed
    assert "can run it: workers/" in printed  # the inference server registered itself
    assert "TRAINING_JOB_STATE_SUCCEEDED models/tiny-llama-chat" in printed
    assert "answered by 127.0.0.1:" in printed
    assert "NOT_FOUND MODEL_NOT_FOUND" in printed


def test_cli_against_the_real_services(
    stack: Stack, run_cli: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole loop through `modelyard`: import, route, train, plot, generate, chat."""
    monkeypatch.chdir(stack.folder)
    monkeypatch.setenv("MODELYARD_CATALOG_ADDRESS", stack.catalog)
    monkeypatch.setenv("MODELYARD_TRAINER_ADDRESS", stack.trainer)
    (stack.folder / "cli.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Say {i}.", "completion": f" {i} {i} {i}"}) + "\n" for i in range(16))
    )

    imported = run_cli("models", "import", "./tiny-llama", "--name", "cli-llama", "--json")
    assert imported.code == 0, imported.err
    assert json.loads(imported.out)["model"]["state"] == "MODEL_STATE_READY"

    routed = run_cli("route", "cli-llama")
    assert routed.code == 0, routed.out
    assert "1. workers/inference-" in routed.out and "transformers" in routed.out

    trained = run_cli(
        "train", "cli-llama", "cli.jsonl", "--max-steps", "3", "--output-name", "cli-llama-ft", "--watch"
    )
    assert trained.code == 0, trained.out + trained.err
    job = trained.out.splitlines()[0].split()[1]  # created trainingJobs/ID (QUEUED)
    assert trained.out.splitlines()[-1].endswith("state SUCCEEDED -> models/cli-llama-ft")

    assert job.removeprefix("trainingJobs/") in run_cli("jobs", "list").out
    assert re.search(r"^state:\s+SUCCEEDED$", run_cli("jobs", "show", job).out, flags=re.M)
    plotted = run_cli("jobs", "plot", job, "-o", "loss.png", "--json")
    assert plotted.code == 0, plotted.err
    assert len(json.loads(plotted.out)["loss"]) == 3  # every step watched during `train --watch`
    assert (stack.folder / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    lineage = run_cli("models", "lineage", "cli-llama")
    assert "models/cli-llama-ft" in lineage.out

    generated = run_cli(
        "generate", "cli-llama", "Say 3.", "--adapter", "cli-llama-ft",
        "--max-tokens", "5", "--temperature", "0", "--json",
    )  # fmt: skip
    assert generated.code == 0, generated.err
    reply = json.loads(generated.out)
    assert reply["usage"]["completionTokens"] == 5

    streamed = run_cli("generate", "cli-llama", "Say 3.", "--max-tokens", "4", "--stream")
    assert streamed.code == 0, streamed.err
    assert "4 completion tokens" in streamed.err

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/exit\n"))
    chatted = run_cli("chat", "cli-llama", "--max-tokens", "4", "--json")
    assert chatted.code == 0, chatted.err
    assert json.loads(chatted.out)["choices"][0]["message"]["role"] == "assistant"
