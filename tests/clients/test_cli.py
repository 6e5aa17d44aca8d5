"""The `modelyard` CLI through real servers: output a person reads, JSON a script reads, exit codes.

Catalog commands run against the real CatalogService; `train`/`jobs` against
a fake trainer and `generate`/`chat` against fake inference workers (test
doubles on real gRPC servers).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from google.protobuf import json_format

from clients.cli import build_parser
from clients.commands.common import CATALOG, INFERENCE, address
from clients.commands.models import ImportWatcher
from clients.output import StatusLine
from modelyard.catalog.v1 import catalog_service_pb2, worker_pb2
from modelyard.inference.v1 import inference_service_pb2 as ipb
from modelyard.trainer.v1 import trainer_service_pb2 as tpb
from tests.clients.conftest import Catalog, Result, Served
from tests.helpers import free_port

Cli = Callable[..., Result]


# ---- parsing and help ---------------------------------------------------------------------------------


def _leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, parser)]
    leaves = []
    for name, child in subs[0].choices.items():
        leaves.extend(_leaves(child, (*path, name)))
    return leaves


def test_every_command_has_a_description_and_help_for_every_option() -> None:
    leaves = dict(_leaves(build_parser()))
    expected = {
        ("models", c) for c in ("import", "list", "show", "validate", "delete", "lineage", "types")
    } | {("jobs", c) for c in ("list", "show", "watch", "cancel", "plot")} | {
        ("workers", "list"), ("workers", "show"), ("route",), ("train",), ("generate",), ("chat",), ("serve",)
    }  # fmt: skip
    assert expected <= set(leaves)
    for path, parser in leaves.items():
        assert parser.description, f"modelyard {' '.join(path)} has no description"
        for action in parser._actions:
            assert action.help, f"modelyard {' '.join(path)}: {action.dest} has no help"


def test_help_exits_zero(run_cli: Cli) -> None:
    result = run_cli("models", "import", "--help")
    assert result.code == 0
    assert "IMPORTING -> VALIDATING -> READY" in result.out
    assert "$MODELYARD_CATALOG_ADDRESS" in result.out


def test_addresses_come_from_flags_then_environment_then_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    args = parser.parse_args(["generate", "m", "p"])
    assert address(args, CATALOG) == "localhost:50051"
    assert address(args, INFERENCE) == "localhost:50053"
    monkeypatch.setenv("MODELYARD_CATALOG_ADDRESS", "catalog:1")
    assert address(args, CATALOG) == "catalog:1"
    args = parser.parse_args(["generate", "m", "p", "--catalog", "flag:2"])
    assert address(args, CATALOG) == "flag:2"


def test_usage_errors_exit_2(run_cli: Cli) -> None:
    assert run_cli("models", "show").code == 2
    assert run_cli("train", "tiny").code == 2
    assert run_cli("models", "import", "x", "--label", "no-equals-sign").code == 2
    assert run_cli("train", "tiny", "d.jsonl", "--method", "sft").code == 2


def test_unreachable_service_exits_3(run_cli: Cli) -> None:
    result = run_cli("models", "list", "--catalog", f"127.0.0.1:{free_port()}", "--timeout", "5")
    assert result.code == 3
    assert result.err.startswith("error: UNAVAILABLE")


# ---- models -------------------------------------------------------------------------------------------


def test_models_import_list_show_through_the_catalog(
    run_cli: Cli, catalog: Catalog, gguf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "tiny.gguf").write_bytes((gguf_dir / "tiny.gguf").read_bytes())
    monkeypatch.chdir(folder)  # a relative SOURCE is sent as an absolute path
    c = ("--catalog", catalog.address)

    result = run_cli(
        "models",
        "import",
        "tiny.gguf",
        "--name",
        "tiny",
        "--tag",
        "demo",
        "--label",
        "team=nlp",
        "--json",
        *c,
    )
    assert result.code == 0, result.err
    imported = json_format.Parse(result.out, catalog_service_pb2.ImportModelResponse()).model
    assert imported.name == "models/tiny"
    assert imported.source.local.path == str(folder / "tiny.gguf")
    assert (list(imported.tags), dict(imported.labels)) == (["demo"], {"team": "nlp"})

    listed = run_cli("models", "list", *c)
    assert listed.code == 0
    header, row = listed.out.splitlines()
    assert header.split() == ["NAME", "KIND", "TYPE", "ARCHITECTURE", "PARAMS", "SIZE", "STATE", "PARENT"]
    assert row.split()[:4] == ["tiny", "LLM", "llama", "LlamaForCausalLM"]
    assert "READY" in row

    as_json = run_cli("models", "list", "--filter", 'name = "ti*"', "--json", *c)
    assert [m["name"] for m in json.loads(as_json.out)["models"]] == ["models/tiny"]
    assert "no models match" in run_cli("models", "list", "--filter", 'name = "zz*"', *c).out

    shown = run_cli("models", "show", "tiny", *c)
    assert shown.code == 0
    assert "state:         READY" in shown.out
    assert "weight_format:" in shown.out and "GGUF" in shown.out
    assert imported.files[0].sha256[:16] in shown.out

    missing = run_cli("models", "show", "nope", *c)
    assert missing.code == 1
    assert "NOT_FOUND" in missing.err


def test_models_validate_lineage_types_delete(run_cli: Cli, catalog: Catalog, gguf_dir: Path) -> None:
    c = ("--catalog", catalog.address)
    base = catalog.import_gguf(gguf_dir, "base")
    catalog.import_gguf(gguf_dir, "child", file="tiny-b.gguf", parent="base")

    valid = run_cli("models", "validate", "base", *c)
    assert valid.code == 0
    assert "models/base: valid" in valid.out
    assert "PASS" in valid.out

    lineage = run_cli("models", "lineage", "base", *c)
    assert lineage.out.splitlines() == [
        "models/base  (LLM, READY)  <- this model",
        "  models/child  (LLM, READY)",
    ]
    assert (
        json.loads(run_cli("models", "lineage", "child", "--json", *c).out)["ancestors"][0]["name"]
        == "models/base"
    )

    types = run_cli("models", "types", "base", *c)
    assert "model type:        llama" in types.out
    by_path = run_cli("models", "types", "--path", base.local_path, "--json", *c)
    assert json.loads(by_path.out)["modelType"] == "llama"

    refused = run_cli("models", "delete", "base", *c)
    assert refused.code == 1
    assert "MODEL_HAS_DESCENDANTS" in refused.err
    deleted = run_cli("models", "delete", "base", "--force", *c)
    assert deleted.code == 0
    assert sorted(deleted.out.splitlines()) == ["deleted models/base", "deleted models/child"]


def test_models_validate_exits_1_when_invalid(run_cli: Cli, catalog: Catalog, gguf_dir: Path) -> None:
    model = catalog.import_gguf(gguf_dir, "broken")
    Path(model.local_path).write_bytes(b"GGUF")  # truncated after import
    result = run_cli("models", "validate", "broken", "--catalog", catalog.address)
    assert result.code == 1
    assert "models/broken: INVALID" in result.out
    assert "FAIL" in result.out
    as_json = run_cli("models", "validate", "broken", "--json", "--catalog", catalog.address)
    assert as_json.code == 1
    assert json.loads(as_json.out).get("valid", False) is False


def test_import_watcher_follows_the_model_to_ready(catalog: Catalog, gguf_dir: Path) -> None:
    out = io.StringIO()
    watcher = ImportWatcher(catalog.client, StatusLine(out), "source", "watched")
    watcher.start()
    assert watcher.attempted.wait(10)  # looked before the entry exists: NOT_FOUND, retried
    catalog.import_gguf(gguf_dir, "watched")
    watcher._thread.join(timeout=10)
    assert not watcher._thread.is_alive()
    assert out.getvalue().splitlines()[-1] == "models/watched: READY"

    # An id that is already taken by a finished model shows nothing (the import's error says it).
    quiet = io.StringIO()
    again = ImportWatcher(catalog.client, StatusLine(quiet), "source", "watched")
    again.start()
    again._thread.join(timeout=10)
    assert not again._thread.is_alive()
    assert quiet.getvalue() == ""


# ---- workers and routing ------------------------------------------------------------------------------


def test_workers_list_and_route_show_the_catalogs_answers(
    run_cli: Cli, catalog: Catalog, gguf_dir: Path, start_worker: Callable[..., Served]
) -> None:
    c = ("--catalog", catalog.address)
    assert "no workers are registered" in run_cli("workers", "list", *c).out
    catalog.import_gguf(gguf_dir, "tiny")
    catalog.register("cpp-1", start_worker().address, free_gib=8)
    catalog.register("vllm-1", "127.0.0.1:1", engine="vllm")

    table = run_cli("workers", "list", *c).out.splitlines()
    assert table[0].split()[:5] == ["NAME", "ROLE", "ENGINE", "STATE", "ADDRESS"]
    assert [line.split()[0] for line in table[1:]] == ["cpp-1", "vllm-1"]
    assert "llama-cpp 1.0" in table[1] and "HEALTHY" in table[1]
    listed = json.loads(run_cli("workers", "list", "--json", *c).out)
    assert [w["name"] for w in listed["workers"]] == ["workers/cpp-1", "workers/vllm-1"]
    assert "capabilities.engine:" in run_cli("workers", "show", "cpp-1", *c).out

    api = catalog.client.find_workers("tiny", worker_pb2.WORKER_ROLE_INFERENCE)
    routed = run_cli("route", "tiny", *c)
    assert routed.code == 0
    assert "1. workers/cpp-1" in routed.out
    assert "rejected:" in routed.out
    for match in [*api.matches, *api.rejected]:
        for result in match.report.results:
            if result.rule != "worker_state":  # its message says how many seconds ago
                assert f"{result.rule}" in routed.out and result.message in routed.out
    as_json = json_format.Parse(
        run_cli("route", "tiny", "--json", *c).out, catalog_service_pb2.FindWorkersResponse()
    )
    assert [m.worker.name for m in as_json.matches] == [m.worker.name for m in api.matches]
    assert [(r.rule, r.outcome) for m in as_json.rejected for r in m.report.results] == [
        (r.rule, r.outcome) for m in api.rejected for r in m.report.results
    ]

    nobody = run_cli("route", "tiny", "--role", "training", *c)
    assert nobody.code == 1
    assert "no worker can run models/tiny (training)" in nobody.out


# ---- training -----------------------------------------------------------------------------------------


def test_train_with_watch_follows_the_job(
    run_cli: Cli, trainer: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "chat.jsonl").write_text('{"messages": []}\n')
    monkeypatch.chdir(tmp_path)
    result = run_cli(
        "train", "tiny", "chat.jsonl", "--method", "lora", "--max-steps", "6", "--lora-r", "4",
        "--learning-rate", "1e-4", "--output-name", "tiny-ft", "--watch", "--trainer", trainer.address,
    )  # fmt: skip
    assert result.code == 0, result.err
    sent = trainer.servicer.requests[-1]
    assert isinstance(sent, tpb.CreateTrainingJobRequest)
    assert sent.job.dataset.source == str(tmp_path / "chat.jsonl")
    assert (sent.job.hyperparameters.max_steps, sent.job.hyperparameters.lora.r) == (6, 4)
    lines = result.out.splitlines()
    assert lines[0] == "created trainingJobs/job-1 (QUEUED)"
    assert "trainingJobs/job-1: state RUNNING" in lines
    assert any("step 6/6 loss 0.5" in line for line in lines)
    assert any("eval loss" in line for line in lines)
    assert lines[-1] == "trainingJobs/job-1: state SUCCEEDED -> models/tiny-ft"


def test_jobs_list_show_cancel_and_watch_exit_codes(run_cli: Cli, trainer: Served) -> None:
    t = ("--trainer", trainer.address)
    assert run_cli("train", "tiny", "--dataset", "/d.jsonl", *t).code == 0
    assert run_cli("train", "tiny", "/d.jsonl", "--label", "fail=1", *t).code == 0

    listed = run_cli("jobs", "list", *t).out.splitlines()
    assert listed[0].split()[:4] == ["NAME", "BASE", "MODEL", "METHOD"]
    assert [line.split()[0] for line in listed[1:]] == ["job-2", "job-1"]
    shown = run_cli("jobs", "show", "job-1", *t)
    assert "state:         QUEUED" in shown.out
    assert "method:        lora" in shown.out

    watched = run_cli("jobs", "watch", "job-1", "--json", *t)
    assert watched.code == 0
    events = [json_format.Parse(line, tpb.WatchTrainingJobResponse()) for line in watched.out.splitlines()]
    assert events[-1].job.state == tpb.TRAINING_JOB_STATE_SUCCEEDED

    failed = run_cli("jobs", "watch", "job-2", *t)
    assert failed.code == 1
    assert "state FAILED: loss became NaN at step 6 [TRAINING_DIVERGED]" in failed.out

    cancelled = run_cli("jobs", "cancel", "trainingJobs/job-1", *t)
    assert cancelled.out.strip() == "trainingJobs/job-1: CANCELLED"
    assert run_cli("jobs", "show", "nope", *t).code == 1


def test_jobs_plot_writes_the_loss_curves(run_cli: Cli, trainer: Served, tmp_path: Path) -> None:
    from PIL import Image

    t = ("--trainer", trainer.address)
    run_cli("train", "tiny", "/d.jsonl", *t)
    empty = run_cli("jobs", "plot", "job-1", "--no-follow", "-o", str(tmp_path / "none.png"), *t)
    assert empty.code == 1
    assert "no loss history" in empty.err

    # The job is queued: plot follows it to its end, recording every step, then draws.
    png = tmp_path / "loss.png"
    plotted = run_cli("jobs", "plot", "job-1", "-o", str(png), "--json", *t)
    assert plotted.code == 0, plotted.err
    points = json.loads(plotted.out)
    assert [step for step, _ in points["loss"]] == [1, 2, 3, 4, 5, 6]
    assert points["evalLoss"] == [[3, pytest.approx(3.5 / 3)], [6, pytest.approx(3.5 / 6)]]
    with Image.open(png) as image:
        assert image.format == "PNG"
        counted = image.convert("RGB").getcolors(maxcolors=1_000_000) or []
        colors = [tuple(color) for _, color in counted if isinstance(color, tuple)]

    def near(target: tuple[int, int, int]) -> bool:
        return any(sum(abs(int(a) - b) for a, b in zip(color, target, strict=True)) < 60 for color in colors)

    assert near((31, 119, 180))  # the training loss line (matplotlib's or Pillow's drawing)
    assert near((255, 127, 14))  # the eval loss line and markers

    # Later plots of the finished job use the recorded history.
    again = run_cli("jobs", "plot", "job-1", "-o", str(tmp_path / "again.png"), *t)
    assert again.code == 0
    assert (
        again.out.strip()
        == f"wrote {tmp_path / 'again.png'} (6 training loss point(s), 2 eval loss point(s))"
    )


# ---- generation ---------------------------------------------------------------------------------------


def test_generate_direct_streamed_and_json(
    run_cli: Cli, start_worker: Callable[..., Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    served = start_worker("the answer")
    i = ("--inference", served.address)
    plain = run_cli("generate", "tiny", "Hello", "--max-tokens", "4", "--temperature", "0", "--seed", "3", *i)
    assert plain.code == 0
    assert plain.out == "the answer\n"
    assert f"worker {served.address}" in plain.err
    sent = served.servicer.requests[-1]
    assert (sent.sampling.max_tokens, sent.sampling.temperature, sent.sampling.seed) == (4, 0.0, 3)

    streamed = run_cli("generate", "tiny", "Hello", "--stream", *i)
    assert streamed.out == "the answer\n"
    assert "finish length" in streamed.err

    as_json = json_format.Parse(
        run_cli("generate", "tiny", "Hello", "--json", *i).out, ipb.GenerateResponse()
    )
    assert as_json.completions[0].text == "the answer"
    stream_json = run_cli("generate", "tiny", "Hello", "--stream", "--json", *i).out.splitlines()
    assert [json.loads(line)["text"] for line in stream_json] == ["the", " answer"]

    monkeypatch.setenv("MODELYARD_INFERENCE_ADDRESS", served.address)  # env instead of the flag
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin"))
    assert run_cli("generate", "tiny", "-").out == "the answer\n"
    assert served.servicer.requests[-1].prompt == "from stdin"

    missing = run_cli("generate", "missing", "x", *i)
    assert missing.code == 1
    assert "MODEL_NOT_FOUND" in missing.err


def test_generate_is_routed_through_the_catalog(
    run_cli: Cli, catalog: Catalog, gguf_dir: Path, start_worker: Callable[..., Served]
) -> None:
    catalog.import_gguf(gguf_dir, "tiny")
    served = start_worker("routed answer")
    catalog.register("cpp-1", served.address)
    result = run_cli("generate", "tiny", "Hello", "--catalog", catalog.address)
    assert result.code == 0, result.err
    assert result.out == "routed answer\n"
    assert f"worker {served.address}" in result.err

    nobody = run_cli("generate", "tiny", "Hello", "--catalog", catalog.address, "--adapter", "tiny")
    assert nobody.code == 0  # routed by the adapter id: the same model here
    catalog.client.deregister_worker("cpp-1")
    refused = run_cli("generate", "tiny", "Hello", "--catalog", catalog.address)
    assert refused.code == 1
    assert "NO_COMPATIBLE_WORKER" in refused.err


def test_chat_reads_messages_from_piped_stdin(
    run_cli: Cli, start_worker: Callable[..., Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    served = start_worker()
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\nsecond\n/exit\nnever sent\n"))
    result = run_cli("chat", "tiny", "--system", "terse", "--max-tokens", "8", "--inference", served.address)
    assert result.code == 0
    assert result.out.splitlines() == ["[terse] echo 1: hi", "[terse] echo 2: second"]
    last = served.servicer.requests[-1]
    assert isinstance(last, ipb.StreamChatRequest)
    assert [(m.role, m.content) for m in last.messages] == [
        ("system", "terse"),
        ("user", "hi"),
        ("assistant", "[terse] echo 1: hi"),
        ("user", "second"),
    ]

    monkeypatch.setattr(sys, "stdin", io.StringIO("one\n/reset\ntwo\n"))
    lines = run_cli("chat", "tiny", "--json", "--inference", served.address).out.splitlines()
    replies = [json_format.Parse(line, ipb.ChatResponse()) for line in lines]
    assert [r.choices[0].message.content for r in replies] == ["echo 1: one", "echo 1: two"]
