"""Validation checks on real tiny models: what passes, and what a broken model is told."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from catalog_service.detection import detect
from catalog_service.validation import FAIL, PASS, SKIP, WARN, Check, validate
from modelyard.catalog.v1 import catalog_service_pb2, model_pb2, worker_pb2


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A llama folder, a LoRA adapter for it, a GGUF file and a tiny SD 1.5 pipeline."""
    from tinymodels.diffusion import build_sd15_pipeline
    from tinymodels.gguf_file import build_gguf
    from tinymodels.llm import build_llm, build_lora_adapter

    root = tmp_path_factory.mktemp("validation")
    llama = build_llm(root / "llama", "llama")
    return {
        "llama": llama,
        "lora": build_lora_adapter(llama, root / "lora"),
        "gguf": build_gguf(root / "gguf" / "tiny.gguf", source_dir=llama),
        "sd15": build_sd15_pipeline(root / "sd15"),
    }


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        return Path(shutil.copytree(src, dst))
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(src, dst))


def _edit_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _by_id(checks: list[Check]) -> dict[str, Check]:
    return {c.check: c for c in checks}


def _failed(checks: list[Check]) -> list[str]:
    return [c.check for c in checks if c.outcome == FAIL]


def test_llm_folder_passes_every_check(built: dict[str, Path]) -> None:
    checks = validate(built["llama"], detect(built["llama"]))
    by_id = _by_id(checks)
    assert _failed(checks) == []
    for check in (
        "config_json_present",
        "tokenizer_present",
        "json_parses",
        "weights_present",
        "weights_readable",
        "weights_match_config",
        "tokenizer_fits_vocab",
        "chat_template_compiles",
    ):
        assert by_id[check].outcome == PASS, by_id[check]
    assert "forward_pass" not in by_id  # only with deep=True
    assert all(c.message for c in checks)


def test_deep_check_runs_a_forward_pass(built: dict[str, Path]) -> None:
    forward = _by_id(validate(built["llama"], detect(built["llama"]), deep=True))["forward_pass"]
    assert forward.outcome == PASS
    assert "LlamaForCausalLM" in forward.message and "finite" in forward.message


def test_deep_check_of_adapter_and_gguf(built: dict[str, Path]) -> None:
    for name in ("lora", "gguf"):
        checks = validate(built[name], detect(built[name]), deep=True)
        assert _failed(checks) == [], name
        assert _by_id(checks)["forward_pass"].outcome == PASS


def test_deep_check_is_skipped_for_image_models(built: dict[str, Path]) -> None:
    checks = validate(built["sd15"], detect(built["sd15"]), deep=True)
    assert _failed(checks) == []
    assert _by_id(checks)["forward_pass"].outcome == SKIP


def test_missing_tokenizer_fails(built: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(built["llama"], tmp_path / "no-tokenizer")
    (folder / "tokenizer.json").unlink()
    check = _by_id(validate(folder, detect(folder)))["tokenizer_present"]
    assert check.outcome == FAIL
    assert "tokenizer.json" in check.message


def test_missing_weights_fail(built: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(built["llama"], tmp_path / "no-weights")
    (folder / "model.safetensors").unlink()
    checks = validate(folder, detect(folder))
    assert _by_id(checks)["weights_present"].outcome == FAIL
    assert _by_id(checks)["field_parameter_count"].outcome == WARN


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("vocab_size", 600, "vocab_size 600"),
        ("hidden_size", 96, "hidden_size 96"),
        ("num_hidden_layers", 3, "says 3"),
    ],
)
def test_weights_inconsistent_with_config_fail(
    key: str, value: int, words: str, built: dict[str, Path], tmp_path: Path
) -> None:
    folder = _copy(built["llama"], tmp_path / "edited")
    _edit_json(folder / "config.json", lambda c: c.update({key: value}))
    check = _by_id(validate(folder, detect(folder)))["weights_match_config"]
    assert check.outcome == FAIL
    assert words in check.message


def test_tokenizer_larger_than_the_vocabulary_fails(built: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(built["llama"], tmp_path / "small-vocab")
    _edit_json(folder / "config.json", lambda c: c.update(vocab_size=100))
    check = _by_id(validate(folder, detect(folder)))["tokenizer_fits_vocab"]
    assert check.outcome == FAIL
    assert "100" in check.message


def test_broken_files_are_reported_as_checks_given_the_stored_config(
    built: dict[str, Path], tmp_path: Path
) -> None:
    """ValidateModel on an entry whose files broke after import: the stored config drives the checks."""
    stored = detect(built["llama"]).config
    folder = _copy(built["llama"], tmp_path / "broken")
    (folder / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>",\n "eos_token" "</s>"}', encoding="utf-8"
    )
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    checks = _by_id(validate(folder, stored))
    assert checks["json_parses"].outcome == FAIL
    assert (
        "tokenizer_config.json" in checks["json_parses"].message and "line 2" in checks["json_parses"].message
    )
    assert checks["weights_readable"].outcome == FAIL
    assert "model.safetensors" in checks["weights_readable"].message


def test_validate_without_a_detection_reports_detection_errors(
    built: dict[str, Path], tmp_path: Path
) -> None:
    folder = _copy(built["llama"], tmp_path / "corrupt-config")
    (folder / "config.json").write_text("{", encoding="utf-8")
    checks = validate(folder)
    assert [(c.check, c.outcome) for c in checks] == [("model_detected", FAIL)]
    assert "config.json" in checks[0].message


def test_remote_code_is_flagged_and_not_run(built: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(built["llama"], tmp_path / "remote")
    _edit_json(folder / "config.json", lambda c: c.update(auto_map={"AutoModelForCausalLM": "x.Y"}))
    checks = _by_id(validate(folder, detect(folder), deep=True))
    assert checks["no_remote_code"].outcome == WARN
    assert checks["forward_pass"].outcome == SKIP


def test_adapter_checks(built: dict[str, Path], tmp_path: Path) -> None:
    checks = _by_id(validate(built["lora"], detect(built["lora"])))
    for check in (
        "adapter_config_present",
        "adapter_weights_present",
        "weights_readable",
        "adapter_rank_matches",
    ):
        assert checks[check].outcome == PASS
    assert checks["base_model_available"].outcome == PASS

    folder = _copy(built["lora"], tmp_path / "wrong-rank")
    _edit_json(folder / "adapter_config.json", lambda c: c.update(r=4, base_model_name_or_path="org/base"))
    checks = _by_id(validate(folder, detect(folder)))
    assert checks["adapter_rank_matches"].outcome == FAIL
    assert "r=4" in checks["adapter_rank_matches"].message
    assert checks["base_model_available"].outcome == WARN
    assert "org/base" in checks["base_model_available"].message


def test_diffusers_checks(built: dict[str, Path], tmp_path: Path) -> None:
    checks = validate(built["sd15"], detect(built["sd15"]))
    assert _failed(checks) == []
    assert _by_id(checks)["components_consistent"].outcome == PASS

    folder = _copy(built["sd15"], tmp_path / "no-vae-weights")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    check = _by_id(validate(folder, detect(folder)))["components_present"]
    assert check.outcome == FAIL
    assert "vae/ has no weights" in check.message


def test_gguf_checks_and_missing_fields_as_warnings(built: dict[str, Path], tmp_path: Path) -> None:
    from tinymodels.gguf_file import build_gguf

    checks = _by_id(validate(built["gguf"], detect(built["gguf"])))
    assert checks["weights_readable"].outcome == PASS
    assert checks["tokenizer_present"].outcome == PASS

    bare = build_gguf(tmp_path / "bare.gguf", chat_template=None)
    checks = _by_id(validate(bare, detect(bare)))
    warning = checks["field_tokenizer_chat_template"]
    assert warning.outcome == WARN
    assert "chat template" in warning.message


def test_single_file_image_checks(tmp_path: Path) -> None:
    from tinymodels.diffusion import build_textual_inversion

    path = build_textual_inversion(tmp_path / "emb.safetensors", "sd15")
    checks = _by_id(validate(path, detect(path)))
    assert checks["checkpoint_type_detected"].outcome == PASS
    assert checks["field_base_model"].outcome == WARN
    assert "civitai" in checks["field_base_model"].message


def test_check_to_proto() -> None:
    check = Check("json_parses", PASS, "2 JSON file(s) parse.")
    assert check.to_proto() == catalog_service_pb2.ValidationCheck(
        check="json_parses", outcome=worker_pb2.RULE_OUTCOME_PASS, message="2 JSON file(s) parse."
    )


def test_stored_image_config_is_accepted(built: dict[str, Path]) -> None:
    stored = detect(built["sd15"]).config
    assert isinstance(stored, model_pb2.ImageConfig)
    assert _failed(validate(built["sd15"], stored)) == []
