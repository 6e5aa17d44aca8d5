"""What the CLI prints: proto JSON like grpcurl, tables, readable fields, the status line."""

from __future__ import annotations

import io
import json

from google.protobuf import json_format

from clients.commands.views import event_line, model_rows, progress_text, route_text
from clients.output import (
    StatusLine,
    duration_text,
    enum_label,
    human_bytes,
    human_count,
    message_fields,
    progress_bar,
    table,
    to_json,
)
from modelyard.catalog.v1 import catalog_service_pb2, model_pb2, worker_pb2
from modelyard.trainer.v1 import trainer_service_pb2 as tpb


def _model() -> model_pb2.Model:
    return model_pb2.Model(
        name="models/tiny",
        kind=model_pb2.MODEL_KIND_LLM,
        state=model_pb2.MODEL_STATE_READY,
        size_bytes=3 * 1024 * 1024,
        parent="models/base",
        llm=model_pb2.LlmConfig(
            architecture="LlamaForCausalLM",
            model_type="llama",
            parameter_count=3_100_000,
            context_length=2048,
            weight_format=model_pb2.WEIGHT_FORMAT_SAFETENSORS,
            tokenizer=model_pb2.TokenizerInfo(chat_template="{% for m in messages %}" * 10),
        ),
    )


def test_json_is_grpcurl_style_proto_json() -> None:
    text = to_json(_model())
    data = json.loads(text)
    # camelCase names, enums by name, int64 as strings: what grpcurl prints.
    assert data["sizeBytes"] == str(3 * 1024 * 1024)
    assert data["state"] == "MODEL_STATE_READY"
    assert data["llm"]["modelType"] == "llama"
    assert data["llm"]["parameterCount"] == "3100000"
    assert json_format.Parse(text, model_pb2.Model()) == _model()
    assert "\n" not in to_json(_model(), indent=None)


def test_table_aligns_columns_and_marks_empty_cells() -> None:
    text = table(["NAME", "STATE"], [["tiny", "READY"], ["a-much-longer-name", ""]])
    lines = text.splitlines()
    assert lines[0] == "NAME                STATE"
    assert lines[1] == "tiny                READY"
    assert lines[2] == "a-much-longer-name  -"


def test_model_rows_show_kind_type_size_and_parent() -> None:
    row = model_rows([_model()])[0]
    assert row == ["tiny", "LLM", "llama", "LlamaForCausalLM", "3.1M", "3.0 MiB", "READY", "base"]


def test_readable_values() -> None:
    assert enum_label(model_pb2.ModelState.DESCRIPTOR, model_pb2.MODEL_STATE_VALIDATING) == "VALIDATING"
    assert enum_label(worker_pb2.RuleOutcome.DESCRIPTOR, worker_pb2.RULE_OUTCOME_FAIL) == "FAIL"
    assert enum_label(model_pb2.ModelState.DESCRIPTOR, 0) == "-"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(0) == "-"
    assert human_count(139_584) == "139.6K"
    assert duration_text(75) == "1m15s"
    assert duration_text(3.25) == "3.2s"
    assert duration_text(3 * 3600 + 120) == "3h02m"
    assert progress_bar(5, 10, width=10) == "[#####-----]"
    assert progress_bar(0, 0, width=4) == "[    ]"


def test_message_fields_flatten_set_fields_and_shorten_long_texts() -> None:
    fields = dict(message_fields(_model().llm))
    assert fields["architecture"] == "LlamaForCausalLM"
    assert fields["weight_format"] == "SAFETENSORS"
    assert fields["context_length"] == "2048"
    assert str(fields["tokenizer.chat_template"]).endswith("(230 chars)")
    assert "vocab_size" not in fields  # unset optional fields stay out


def test_status_line_off_a_terminal_prints_each_change_once() -> None:
    out = io.StringIO()
    status = StatusLine(out)
    for text in ["models/x: IMPORTING", "models/x: IMPORTING", "models/x: READY"]:
        status.update(text)
    status.close()
    assert out.getvalue().splitlines() == ["models/x: IMPORTING", "models/x: READY"]


def test_training_progress_and_events_read_well() -> None:
    job = tpb.TrainingJob(name="trainingJobs/j", state=tpb.TRAINING_JOB_STATE_RUNNING)
    job.progress.step = 5
    job.progress.total_steps = 10
    job.progress.loss = 1.23456
    job.progress.eta.seconds = 65
    assert progress_text(job) == f"RUNNING {progress_bar(5, 10)} step 5/10 loss 1.235 ETA 1m05s"
    job.state = tpb.TRAINING_JOB_STATE_FAILED
    job.error.reason = "OOM"
    job.error.message = "out of memory"
    event = tpb.WatchTrainingJobResponse(event_type=tpb.TRAINING_EVENT_TYPE_STATE_CHANGED, job=job)
    assert event_line(event) == "state FAILED: out of memory [OOM]"


def test_route_text_lists_every_rule_of_matches_and_rejected_workers() -> None:
    response = catalog_service_pb2.FindWorkersResponse()
    good = response.matches.add()
    good.worker.name = "workers/a"
    good.worker.address = "h:1"
    good.report.verdict = worker_pb2.VERDICT_COMPATIBLE
    good.report.results.add(rule="kind", outcome=worker_pb2.RULE_OUTCOME_PASS, message="runs LLM models")
    bad = response.rejected.add()
    bad.worker.name = "workers/b"
    bad.report.verdict = worker_pb2.VERDICT_INCOMPATIBLE
    bad.report.results.add(
        rule="weight_format", outcome=worker_pb2.RULE_OUTCOME_FAIL, message="GGUF needs llama-cpp"
    )
    text = route_text(response, "models/m", "inference")
    assert "1. workers/a  (h:1, COMPATIBLE)" in text
    assert "PASS  kind  runs LLM models" in text
    assert "rejected:" in text
    assert "FAIL  weight_format  GGUF needs llama-cpp" in text


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_line_on_a_terminal_redraws_one_line_and_clears_it() -> None:
    out = _Terminal()
    status = StatusLine(out)
    status.update("step 1")
    status.update("step 2 of 2")
    status.note("eval done")
    status.close()
    text = out.getvalue()
    assert text.startswith("\r| step 1")
    assert "\r/ step 2 of 2" in text
    assert "eval done\n" in text
    assert "eval done\n\r- step 2 of 2" in text  # the status is drawn again below the note
    assert text.endswith("\r" + " " * len("- step 2 of 2") + "\r")  # and is gone at the end


def test_stored_control_characters_are_printed_escaped() -> None:
    """A display name holding an ANSI escape or a carriage return must not drive the terminal."""
    from clients.commands.views import job_block, model_block, validation_text, worker_block

    evil = "nice\x1b[2J\x1b]0;pwned\x07\rfake\x00\x7f\x9b31m\u202etxt"
    model = _model()
    model.display_name = evil
    model.description = evil
    model.labels["k"] = evil
    model.llm.architecture = evil
    model.error.message = evil
    worker = worker_pb2.Worker(name="workers/w", display_name=evil, address=evil)
    job = tpb.TrainingJob(name="trainingJobs/j", error=tpb.TrainingJob().error)
    job.error.message = evil
    job.dataset.source = evil
    event = tpb.WatchTrainingJobResponse(job=job, event_type=tpb.TRAINING_EVENT_TYPE_STATE_CHANGED)
    report = catalog_service_pb2.ValidateModelResponse(valid=False)
    report.checks.add(check="x", outcome=worker_pb2.RULE_OUTCOME_FAIL, message=evil)
    match = catalog_service_pb2.WorkerMatch(worker=worker)
    match.report.results.add(rule="r", outcome=worker_pb2.RULE_OUTCOME_FAIL, message=evil)
    route = catalog_service_pb2.FindWorkersResponse(rejected=[match])
    texts = [
        model_block(model),
        table(["NAME"], [[evil]]),
        worker_block(worker),
        job_block(job),
        event_line(event),
        validation_text(report, "models/x"),
        route_text(route, "models/x", "inference"),
    ]
    for text in texts:
        bad = [c for c in text if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) < 0xA0 or c == "\u202e"]
        assert not bad, (bad, text)
        assert "\\x1b" in text


def test_error_messages_print_control_characters_escaped() -> None:
    import grpc

    from clients.errors import ModelyardRpcError

    error = ModelyardRpcError(grpc.StatusCode.NOT_FOUND, "model \x1b[31mred\x1b[0m not found")
    assert "\x1b" not in str(error) and "\\x1b[31m" in str(error)
