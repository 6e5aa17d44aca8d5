"""The plain rules of image serving: single-file configs, LoRA/base agreement, parameter ranges."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference_service.engines.diffusers_engine import parse_single_file_configs, single_file_config
from inference_service.engines.image_base import ImageRequest, check_image_request
from inference_service.models import image_adapter_mismatch, image_defaults_of
from modelyard.catalog.v1 import model_pb2
from server_kit.errors import FailedPrecondition, InvalidArgument


def _config_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "model_index.json").write_text("{}", encoding="utf-8")
    return path


def test_single_file_configs_map_base_models_to_folders(tmp_path: Path) -> None:
    sd15 = _config_folder(tmp_path / "sd15")
    sdxl = _config_folder(tmp_path / "sdxl")
    configs = parse_single_file_configs([f"sd15={sd15}", f"SDXL={sdxl}", f"sdxl-refiner={sdxl}", ""])
    assert configs == {
        model_pb2.IMAGE_BASE_MODEL_SD_1_5: sd15,
        model_pb2.IMAGE_BASE_MODEL_SDXL: sdxl,
        model_pb2.IMAGE_BASE_MODEL_SDXL_REFINER: sdxl,
    }
    assert parse_single_file_configs([f"IMAGE_BASE_MODEL_SD_1_5={sd15}"]) == {
        model_pb2.IMAGE_BASE_MODEL_SD_1_5: sd15
    }


@pytest.mark.parametrize(
    ("entry", "says"),
    [("sd15", "BASE=FOLDER"), ("sd9=/x", "unknown base model"), ("sd15={missing}", "no model_index.json")],
)
def test_bad_single_file_config_entries_fail_at_start(tmp_path: Path, entry: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_single_file_configs([entry.format(missing=tmp_path / "nothing")])


def test_a_single_file_without_its_config_says_what_to_set(tmp_path: Path) -> None:
    configs = {model_pb2.IMAGE_BASE_MODEL_SD_1_5: _config_folder(tmp_path / "sd15")}
    assert single_file_config(configs, model_pb2.IMAGE_BASE_MODEL_SD_1_5, "models/a") == tmp_path / "sd15"
    with pytest.raises(FailedPrecondition) as caught:
        single_file_config(configs, model_pb2.IMAGE_BASE_MODEL_SDXL, "models/b")
    assert caught.value.reason == "SINGLE_FILE_CONFIG_MISSING"
    assert "MODELYARD_INFERENCE_DIFFUSERS_CONFIGS=sdxl=" in caught.value.message
    assert "configured: sd15" in caught.value.message
    with pytest.raises(FailedPrecondition, match="unknown base model"):
        single_file_config(configs, model_pb2.IMAGE_BASE_MODEL_UNSPECIFIED, "models/c")


def _image(
    name: str,
    base: model_pb2.ImageBaseModel.ValueType,
    kind: model_pb2.CheckpointType.ValueType = model_pb2.CHECKPOINT_TYPE_CHECKPOINT,
) -> model_pb2.Model:
    return model_pb2.Model(name=name, image=model_pb2.ImageConfig(base_model=base, checkpoint_type=kind))


def test_a_lora_applies_only_to_its_base_family() -> None:
    sd15 = _image("models/sd15", model_pb2.IMAGE_BASE_MODEL_SD_1_5)
    lora_xl = _image("models/xl-lora", model_pb2.IMAGE_BASE_MODEL_SDXL, model_pb2.CHECKPOINT_TYPE_LORA)
    lora_15 = _image("models/lora", model_pb2.IMAGE_BASE_MODEL_SD_1_5, model_pb2.CHECKPOINT_TYPE_LORA)
    unknown = _image("models/odd", model_pb2.IMAGE_BASE_MODEL_UNSPECIFIED, model_pb2.CHECKPOINT_TYPE_LORA)
    problem = image_adapter_mismatch(sd15, lora_xl)
    assert problem is not None and "SDXL" in problem and "SD 1.5" in problem
    assert image_adapter_mismatch(sd15, lora_15) is None
    assert image_adapter_mismatch(sd15, unknown) is None  # diffusers refuses it if its layers do not fit


def test_defaults_read_only_what_the_image_config_says() -> None:
    model = _image("models/a", model_pb2.IMAGE_BASE_MODEL_SD_1_5)
    empty = image_defaults_of(model)
    assert (empty.steps, empty.cfg_scale, empty.sampler, empty.resolution, empty.clip_skip) == (None,) * 5
    model.image.steps, model.image.cfg_scale, model.image.resolution = 20, 6.0, 512
    model.image.samplers.append("DDIMScheduler")
    filled = image_defaults_of(model)
    assert (filled.steps, filled.cfg_scale, filled.sampler, filled.resolution) == (
        20,
        6.0,
        "DDIMScheduler",
        512,
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"prompt": " "}, "prompt"),
        ({"steps": 501}, "steps"),
        ({"cfg_scale": float("nan")}, "cfg_scale"),
        ({"seed": -1}, "seed"),
        ({"width": 0}, "width"),
        ({"height": 5000}, "height"),
        ({"clip_skip": 0}, "clip_skip"),
        ({"adapter_scale": 11.0}, "adapter_scale"),
    ],
)
def test_parameters_out_of_range_name_the_field(changes: dict[str, object], field: str) -> None:
    values: dict[str, object] = {"request_id": "r", "prompt": "a cat", **changes}
    with pytest.raises(InvalidArgument) as caught:
        check_image_request(ImageRequest(**values))  # type: ignore[arg-type]
    assert [v.field for v in caught.value.violations] == [field]


def test_parameters_in_range_pass() -> None:
    check_image_request(
        ImageRequest(
            "r", "a cat", steps=500, cfg_scale=0.0, seed=2**63 - 1, width=8, clip_skip=2, adapter_scale=-1
        )
    )
