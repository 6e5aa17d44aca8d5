"""Paths named inside model files are confined like request paths, and special files are refused.

An index's `weight_map`, a diffusers `model_index.json`, an adapter's
`base_model_name_or_path` and the files beside a single file are file *contents*: a
shard named `../../../../etc/x` or `/etc/x` must be refused before anything is opened,
error messages must not echo bytes of files, and a FIFO must never be opened (it would
block a thread forever).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from catalog_service import sources
from catalog_service.detection import detect
from catalog_service.detection.safetensors_header import read_header
from catalog_service.validation import FAIL, PASS, validate
from modelyard.catalog.v1 import model_pb2
from server_kit.errors import InvalidArgument, ModelyardError, PermissionDenied

SECRET = b"SECRET!!" + b"x" * 64
"""An outside file whose first 8 bytes read as a huge little-endian header length."""
SECRET_NUMBER = str(struct.unpack("<Q", SECRET[:8])[0])


def _safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * offset)
    return path


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """(allowed root, outside folder holding `secret.safetensors`)."""
    root = tmp_path / "allowed"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(SECRET)
    base = outside / "base"
    base.mkdir()
    (base / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}), encoding="utf-8"
    )
    return root, outside


def _llm_folder(root: Path, weight_map: dict[str, str]) -> Path:
    folder = root / "model"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 4}),
        encoding="utf-8",
    )
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}), encoding="utf-8")
    _safetensors(folder / "model-00001-of-00001.safetensors", {"model.embed_tokens.weight": ("F32", [4, 2])})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8"
    )
    return folder


def _escapes(outside: Path, folder: Path) -> list[str]:
    relative = os.path.relpath(outside / "secret.safetensors", folder)
    return [relative, str(outside / "secret.safetensors"), "../../../../../../../../etc/hostname"]


def _with_timeout(call: Callable[[], Any], seconds: float = 10.0) -> Any:
    """Run `call` in a thread; fail (instead of hanging the suite) when it blocks."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the call blocked (a FIFO was opened)"
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _unblock(fifo: Path) -> None:
    """Open the FIFO for writing once so a reader blocked on it (a failed test) can go on."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


# --------------------------------------------------------------------------- index shards


def test_index_naming_a_file_outside_the_folder_is_refused_without_reading_it(
    layout: tuple[Path, Path],
) -> None:
    root, outside = layout
    probe = _llm_folder(root, {})
    for shard in _escapes(outside, probe):
        index = probe / "model.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": shard}}), encoding="utf-8")
        with pytest.raises(PermissionDenied) as caught:
            detect(probe, allowed_roots=[root])
        assert caught.value.reason == "PATH_OUTSIDE_ALLOWED_ROOTS"
        assert SECRET_NUMBER not in caught.value.message
        # as ValidateModel runs it: with the config stored at import, deep
        stored = model_pb2.LlmConfig(architecture="LlamaForCausalLM", model_type="llama", vocab_size=4)
        for given in (None, stored):
            checks = {c.check: c for c in validate(probe, given, allowed_roots=[root], deep=True)}
            text = " ".join(c.message for c in checks.values())
            assert SECRET_NUMBER not in text and "SECRET" not in text
            assert any(c.outcome == FAIL for c in checks.values())
            # the deep check never loads weights named outside the folder
            forward = checks.get("forward_pass")
            assert forward is None or (forward.outcome != PASS and "loaded Llama" not in forward.message)


def test_index_naming_a_fifo_answers_invalid_argument_without_blocking(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    folder = _llm_folder(root, {"model.embed_tokens.weight": "pipe.safetensors"})
    fifo = folder / "pipe.safetensors"
    os.mkfifo(fifo)
    try:
        with pytest.raises(InvalidArgument) as caught:
            _with_timeout(lambda: detect(folder, allowed_roots=[root]))
        assert caught.value.reason == "NOT_A_REGULAR_FILE"
        checks = _with_timeout(lambda: validate(folder, allowed_roots=[root]))
        assert any(c.outcome == FAIL for c in checks)
    finally:
        _unblock(fifo)


def test_header_errors_never_echo_file_bytes(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(SECRET)
    with pytest.raises(InvalidArgument) as caught:
        read_header(path)
    assert caught.value.reason == "CORRUPT_WEIGHTS"
    assert SECRET_NUMBER not in caught.value.message
    path.write_bytes(struct.pack("<Q", 2) + b"\xff\xfe")
    with pytest.raises(InvalidArgument) as caught:
        read_header(path)
    assert "0xff" not in caught.value.message


# --------------------------------------------------------------------------- diffusers, adapters, sidecars


def test_diffusers_component_folder_outside_the_pipeline_is_refused(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    folder = root / "pipe"
    folder.mkdir()
    component = os.path.relpath(outside, folder)
    (outside / "config.json").write_text(json.dumps({"sample_size": 8}), encoding="utf-8")
    os.link(outside / "secret.safetensors", outside / "diffusion_pytorch_model.safetensors")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.30.0",
                "unet": ["diffusers", "UNet2DConditionModel"],
                component: ["diffusers", "UNet2DConditionModel"],
            }
        ),
        encoding="utf-8",
    )
    with pytest.raises(PermissionDenied) as caught:
        detect(folder, allowed_roots=[root])
    assert caught.value.reason == "PATH_OUTSIDE_ALLOWED_ROOTS"
    checks = validate(folder, allowed_roots=[root])
    assert any(c.outcome == FAIL for c in checks)
    assert SECRET_NUMBER not in " ".join(c.message for c in checks)


def test_adapter_base_outside_the_roots_is_neither_read_nor_loaded(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    folder = root / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "base_model_name_or_path": str(outside / "base")}),
        encoding="utf-8",
    )
    _safetensors(folder / "adapter_model.safetensors", {"a.lora_A.weight": ("F32", [2, 2])})
    detection = detect(folder, allowed_roots=[root])
    assert detection.config.architecture == ""  # type: ignore[union-attr]
    checks = {c.check: c for c in validate(folder, detection, allowed_roots=[root], deep=True)}
    assert checks["base_model_available"].outcome != PASS
    assert checks["forward_pass"].outcome != PASS


def test_sidecar_linking_outside_the_roots_is_not_read(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    weights = _safetensors(root / "style.safetensors", {"lora_unet_x.lora_down.weight": ("F32", [2, 2])})
    (outside / "meta.json").write_text(json.dumps({"trainedWords": ["SECRETWORD"]}), encoding="utf-8")
    (root / "style.json").symlink_to(outside / "meta.json")
    try:
        detection = detect(weights, allowed_roots=[root])
    except ModelyardError as exc:
        assert "SECRETWORD" not in exc.message
    else:
        assert "SECRETWORD" not in list(detection.config.trigger_words)  # type: ignore[union-attr]


# --------------------------------------------------------------------------- special files as sources


def test_a_fifo_as_the_import_source_is_invalid_argument(tmp_path: Path) -> None:
    root = tmp_path / "allowed"
    root.mkdir()
    for name in ("pipe.safetensors", "pipe"):
        fifo = root / name
        os.mkfifo(fifo)
        try:
            with pytest.raises(InvalidArgument) as caught:
                _with_timeout(partial(sources.resolve, str(fifo), allowed_roots=[root]))
            assert caught.value.reason == "NOT_A_REGULAR_FILE"
        finally:
            _unblock(fifo)


@pytest.mark.parametrize("dtype", ["X99", "Q4_K", "F32 "])
def test_unknown_dtype_with_a_huge_shape_is_corrupt_weights(tmp_path: Path, dtype: str) -> None:
    """An unknown dtype escapes the size check: its shape must not become a 2**124-element count."""
    header = json.dumps({"w": {"dtype": dtype, "shape": [2**62, 2**62], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 4)
    with pytest.raises(InvalidArgument) as caught:
        detect(path)
    assert caught.value.reason == "CORRUPT_WEIGHTS"


def test_tokenizer_files_named_outside_the_folder_fail_validation(layout: tuple[Path, Path]) -> None:
    """`tokenizer_config.json` may name its files (`tokenizer_file`, `vocab_file`): confined too,
    so the deep check's tokenizer load never reads a file outside the model's folder."""
    root, outside = layout
    folder = _llm_folder(root, {"model.embed_tokens.weight": "model-00001-of-00001.safetensors"})
    for name in (str(outside / "secret.safetensors"), "../../outside/secret.safetensors"):
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_file": name}), encoding="utf-8")
        checks = {c.check: c for c in validate(folder, allowed_roots=[root], deep=True)}
        assert checks["named_files_confined"].outcome == FAIL
        assert checks["forward_pass"].outcome != PASS
