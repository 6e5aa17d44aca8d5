"""docs/operations.md works as written, and stays complete.

The recipes: every ```bash block that calls grpcurl (or curl) is run, in document order,
with the real grpcurl and curl binaries against the three services and the HTTP gateway,
started once for this module as real processes (catalog, trainer, inference with the
transformers engine, which starts fastest here; the inference worker registers as
`inference-1`, the name the document uses). The only change made to a block is the
addresses: `localhost:50051/50052/50053/8000` become the test servers'. The ```text
block right after a recipe is its expected output: each of its lines must appear in
what the recipe printed (`…` matches anything),
and a block with an `ERROR:` line documents a failing call (non-zero exit code), any
other one a succeeding call. A recipe preceded by `<!-- doc-test: skip (why) -->` is
not run.

Completeness: every error reason the services can send (each `reason="..."` in the code)
has a row in the document's tables, and every `MODELYARD_*` setting is documented in
operations.md or deployment.md.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

from tests.helpers import BIN, ROOT, ServerProcess, free_port

DOC = ROOT / "docs" / "operations.md"
DEPLOYMENT = ROOT / "docs" / "deployment.md"
SKIP_MARK = "<!-- doc-test: skip"
REASON_PACKAGES = ("catalog_service", "trainer_service", "inference_service", "server_kit", "clients")


@dataclass
class Recipe:
    """A ```bash block that calls grpcurl or curl, with the ```text block that follows it."""

    line: int
    code: str
    expected: str | None
    skip: bool


def recipes(text: str) -> list[Recipe]:
    """The grpcurl and curl recipes of the document, in order."""
    blocks = list(re.finditer(r"^```(\w*)\n(.*?)^```[ \t]*$", text, flags=re.S | re.M))
    found = []
    for index, block in enumerate(blocks):
        language, code = block.group(1), block.group(2)
        if language != "bash" or "curl" not in code:  # grpcurl, or curl for the gateway
            continue
        expected = None
        if index + 1 < len(blocks):
            after = blocks[index + 1]
            if after.group(1) == "text" and not text[block.end() : after.start()].strip():
                expected = after.group(2)
        before = text[: block.start()].rstrip().splitlines()
        skip = bool(before) and before[-1].startswith(SKIP_MARK)
        found.append(Recipe(text.count("\n", 0, block.start()) + 2, code, expected, skip))
    return found


def expected_lines(expected: str) -> list[str]:
    """The lines an output must contain (blank lines and lone `…` dropped)."""
    return [line.strip() for line in expected.splitlines() if line.strip() and line.strip() != "…"]


def line_pattern(line: str) -> re.Pattern[str]:
    """`line` as a pattern: literal text, `…` matching anything on the line."""
    return re.compile(".*".join(re.escape(part) for part in line.split("…")))


# ---- completeness: no servers needed --------------------------------------------------------------


def test_the_recipes_cover_every_service_and_the_rpcs_operators_need() -> None:
    run = "\n".join(recipe.code for recipe in recipes(DOC.read_text()) if not recipe.skip)
    for port in ("50051", "50052", "50053"):
        assert f"localhost:{port} list" in run
    for route in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/metrics"):
        assert f"localhost:8000{route}" in run, f"no recipe calls the gateway's {route}"
    assert "describe modelyard.catalog.v1.CatalogService" in run
    for service in (
        "catalog.v1.CatalogService",
        "trainer.v1.TrainerService",
        "inference.v1.InferenceService",
    ):
        assert f'{{"service": "modelyard.{service}"}}' in run  # health per service name
    for rpc in (
        "CatalogService/GetModel", "CatalogService/ListModels", "CatalogService/ImportModel",
        "CatalogService/FindWorkers", "CatalogService/CheckCompatibility", "CatalogService/WatchModel",
        "CatalogService/ListWorkers", "TrainerService/CreateTrainingJob", "TrainerService/GetTrainingJob",
        "TrainerService/WatchTrainingJob", "InferenceService/Generate", "InferenceService/StreamGenerate",
        "InferenceService/Chat", "InferenceService/StreamChat", "grpc.health.v1.Health/Check",
    ):  # fmt: skip
        assert f"{rpc} " in run or run.count(f"{rpc}\n"), f"no recipe calls {rpc}"


def _reasons_in_code() -> dict[str, str]:
    """Every error reason the code names, with one place that names it."""
    found: dict[str, str] = {}

    def add(value: ast.expr, where: str) -> None:
        values = [value.body, value.orelse] if isinstance(value, ast.IfExp) else [value]
        for item in values:
            if isinstance(item, ast.Constant) and isinstance(item.value, str) and item.value:
                found.setdefault(item.value, where)

    for package in REASON_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, ast.Call):
                    for keyword in node.keywords:
                        if keyword.arg == "reason":
                            add(keyword.value, where)
                elif isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id in ("default_reason", "REASON_NO_COMPATIBLE_WORKER")
                    for t in node.targets
                ):
                    add(node.value, where)
                elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    arguments = node.args.args + node.args.kwonlyargs
                    defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + list(
                        node.args.defaults
                    )
                    defaults += list(node.args.kw_defaults)
                    for argument, default in zip(arguments, defaults, strict=True):
                        if argument.arg == "reason" and default is not None:
                            add(default, where)
    return found


def test_every_error_reason_in_the_code_has_a_row_in_the_document() -> None:
    rows = "\n".join(line for line in DOC.read_text().splitlines() if line.startswith("|"))
    reasons = _reasons_in_code()
    assert len(reasons) > 80  # the scan finds the reasons (a broken scan must not pass)
    missing = {reason: where for reason, where in reasons.items() if f"`{reason}`" not in rows}
    assert not missing, f"error reasons without a row in docs/operations.md: {missing}"


def test_every_setting_is_documented() -> None:
    from catalog_service.settings import CatalogSettings
    from gateway.settings import GatewaySettings
    from inference_service.settings import InferenceSettings
    from server_kit.common import CommonSettings
    from trainer_service.settings import TrainerSettings

    documented = DOC.read_text() + DEPLOYMENT.read_text()
    variables = {
        field.metadata["env"]
        for cls in (CommonSettings, CatalogSettings, TrainerSettings, InferenceSettings, GatewaySettings)
        for field in dataclasses.fields(cls)
        if field.metadata.get("env")
    }
    assert "MODELYARD_INFERENCE_KV_CACHE_BYTES" in variables
    missing = sorted(name for name in variables if f"`{name}`" not in documented)
    assert not missing, f"settings documented in neither operations.md nor deployment.md: {missing}"


# ---- the recipes, against real services --------------------------------------------------------------


@dataclass
class Stack:
    """The running services and the folder the recipes run in."""

    catalog: ServerProcess
    trainer: ServerProcess
    inference: ServerProcess
    gateway: str
    folder: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Catalog, trainer and inference as processes; ./tiny-llama and ./chat.jsonl as the document has them."""
    from tinymodels.llm import build_llm

    folder = tmp_path_factory.mktemp("operations")
    env = {"MODELYARD_DRAIN_SECONDS": "0"}
    catalog = ServerProcess(
        "catalog_service",
        ["--data-dir", str(folder / "catalog")],
        env={**env, "MODELYARD_CATALOG_ALLOWED_ROOTS": str(folder)},
        log_path=folder / "catalog.log",
    )
    workers = {**env, "MODELYARD_CATALOG_ADDRESS": catalog.address}
    trainer = ServerProcess(
        "trainer_service",
        ["--data-dir", str(folder / "trainer")],
        env={
            **workers,
            "MODELYARD_TRAINER_DATASET_ROOTS": str(folder),
            "MODELYARD_TRAINER_POLL_SECONDS": "0.5",
        },
        log_path=folder / "trainer.log",
    )
    inference = ServerProcess(
        "inference_service",
        ["--data-dir", str(folder / "inference")],
        env={
            **workers,
            "MODELYARD_INFERENCE_ENGINE": "transformers",
            "MODELYARD_INFERENCE_WORKER_ID": "inference-1",
        },
        log_path=folder / "inference.log",
    )
    processes = [inference, trainer, catalog]
    gateway_address = f"127.0.0.1:{free_port()}"
    gateway_log = open(folder / "gateway.log", "wb")  # noqa: SIM115
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--address", gateway_address, "--catalog-address", catalog.address],
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdout=gateway_log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        build_llm(folder / "tiny-llama")  # python -m tinymodels llm ./tiny-llama
        (folder / "chat.jsonl").write_bytes(
            resources.files("clients.demo_data").joinpath("chat.jsonl").read_bytes()
        )
        for process in processes:
            process.wait_serving(timeout=180)
        _wait_http(f"http://{gateway_address}/health", gateway, folder / "gateway.log")
        yield Stack(catalog, trainer, inference, gateway_address, folder)
    finally:
        gateway.terminate()
        for process in processes:
            process.terminate(signal.SIGTERM)
        try:
            gateway.wait(30)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait()
        gateway_log.close()
        for process in processes:
            process.stop(timeout=30)


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    """Wait until `url` answers 200; fail with the log when the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")[-4000:]
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer: {log.read_text(errors='replace')[-4000:]}")


@pytest.mark.slow
def test_the_grpcurl_recipes_work_as_written(stack: Stack) -> None:
    text = DOC.read_text()
    addresses = {
        "localhost:50051": stack.catalog.address,
        "localhost:50052": stack.trainer.address,
        "localhost:50053": stack.inference.address,
        "localhost:8000": stack.gateway,
    }
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    ran = skipped = 0
    for recipe in recipes(text):
        if recipe.skip:
            skipped += 1
            continue
        code = recipe.code
        for old, new in addresses.items():
            code = code.replace(old, new)
        result = subprocess.run(
            ["bash", "-e", "-c", code],
            cwd=stack.folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        output = result.stdout + result.stderr
        where = f"docs/operations.md:{recipe.line}:\n{recipe.code}\n--- exit {result.returncode}:\n{output}"
        lines = expected_lines(recipe.expected or "")
        if "ERROR:" in lines:
            assert result.returncode != 0, f"a documented error did not happen: {where}"
        else:
            assert result.returncode == 0, f"a recipe failed: {where}"
        for line in lines:
            assert line_pattern(line).search(output), f"expected {line!r} in the output of {where}"
        ran += 1
    assert ran >= 25 and skipped <= 2, (ran, skipped)

    # The log line the document shows for the request id it sent is in the catalog's log.
    documented = re.search(r"^\S+ \S+ (INFO modelyard\.rpc \[ops-example-1\] .*)$", text, flags=re.M)
    assert documented is not None
    assert documented.group(1) in stack.catalog.log_path.read_text()  # type: ignore[union-attr]
