"""Image models end to end: tiny SD 1.5 / SDXL pipelines (folders, single files, kohya LoRAs)
imported into a real catalog, routed to a real `diffusers` inference worker, and generated
through gRPC, the typed client and the `modelyard generate-image` command.

Everything is built on the spot (random weights, 64x64 images). One module fixture holds the
catalog, the diffusers worker, a transformers worker (real, registered, never loads a model)
and a worker registered as vLLM would register (no vLLM started: routing only reads what a
worker registered).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from clients import cli
from clients.catalog import CatalogClient
from clients.errors import ModelyardRpcError
from clients.inference import AsyncInferenceClient, ImageOptions, InferenceClient
from inference_service.app import InferenceApp
from inference_service.settings import InferenceSettings
from modelyard.catalog.v1 import model_pb2, worker_pb2
from modelyard.inference.v1 import inference_service_pb2 as pb
from tests.servers import ThreadedServer
from tinymodels.diffusion import (
    build_kohya_lora,
    build_sd15_pipeline,
    build_sd_single_file,
    build_sdxl_pipeline,
)

PROMPT = "a photo of a cat"
FAST: ImageOptions = {"steps": 2, "seed": 7}
"""Two denoising steps: enough to exercise the pipeline, fast on 2 cores."""


@dataclass
class Suite:
    """A catalog with the tiny image models, a diffusers worker and two text workers."""

    root: Path
    catalog_server: ThreadedServer
    catalog: CatalogClient
    diffusers_server: ThreadedServer
    text_server: ThreadedServer
    client: InferenceClient
    models: dict[str, model_pb2.Model]

    def close(self) -> None:
        self.client.close()
        self.diffusers_server.stop()
        self.text_server.stop()
        self.catalog.close()
        self.catalog_server.stop()


def _configs_only(pipeline: Path, target: Path) -> Path:
    """The pipeline folder without its weights: all `from_single_file(config=)` needs."""
    return Path(shutil.copytree(pipeline, target, ignore=shutil.ignore_patterns("*.safetensors")))


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    root = tmp_path_factory.mktemp("images")
    sd15 = build_sd15_pipeline(root / "sd15")
    sdxl = build_sdxl_pipeline(root / "sdxl")
    sources = {
        "sd15": sd15,
        "sdxl": sdxl,
        "sd15-file": build_sd_single_file(root / "single" / "sd15.safetensors", "sd15", pipeline_dir=sd15),
        "sdxl-file": build_sd_single_file(root / "single" / "sdxl.safetensors", "sdxl", pipeline_dir=sdxl),
        "lora15": build_kohya_lora(root / "loras" / "lora15.safetensors", "sd15", pipeline_dir=sd15),
        "loraxl": build_kohya_lora(root / "loras" / "loraxl.safetensors", "sdxl", pipeline_dir=sdxl),
    }
    configs = [
        f"sd15={_configs_only(sd15, root / 'configs' / 'sd15')}",
        f"sdxl={_configs_only(sdxl, root / 'configs' / 'sdxl')}",
    ]
    catalog_server = ThreadedServer(
        CatalogApp(CatalogSettings(data_dir=root / "catalog", allowed_roots=[root], heartbeat_ttl_seconds=30))
    )
    catalog = CatalogClient(catalog_server.target)
    models = {name: catalog.import_model(str(path), model_id=name) for name, path in sources.items()}
    diffusers_server = ThreadedServer(
        InferenceApp(
            InferenceSettings(
                data_dir=root / "diffusers",
                catalog_address=catalog_server.target,
                engine="diffusers",
                diffusers_configs=configs,
                worker_id="diffusers-test",
            )
        )
    )
    text_server = ThreadedServer(
        InferenceApp(
            InferenceSettings(
                data_dir=root / "text",
                catalog_address=catalog_server.target,
                engine="transformers",
                worker_id="transformers-test",
            )
        )
    )
    catalog.register_worker(
        "vllm-test",
        worker_pb2.Worker(
            address="127.0.0.1:9",
            role=worker_pb2.WORKER_ROLE_INFERENCE,
            capabilities=worker_pb2.WorkerCapabilities(
                engine="vllm",
                kinds=[model_pb2.MODEL_KIND_LLM],
                weight_formats=[model_pb2.WEIGHT_FORMAT_SAFETENSORS],
                architectures=["LlamaForCausalLM"],
            ),
        ),
    )
    running = Suite(
        root=root,
        catalog_server=catalog_server,
        catalog=catalog,
        diffusers_server=diffusers_server,
        text_server=text_server,
        client=InferenceClient(diffusers_server.target, timeout=300),
        models=models,
    )
    try:
        yield running
    finally:
        running.close()


def _pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _error(call: object) -> ModelyardRpcError:
    assert callable(call)
    with pytest.raises(ModelyardRpcError) as caught:
        call()
    return caught.value


# --------------------------------------------------------------------------- catalog


@pytest.mark.parametrize(
    ("name", "base", "kind", "pipeline"),
    [
        (
            "sd15",
            model_pb2.IMAGE_BASE_MODEL_SD_1_5,
            model_pb2.CHECKPOINT_TYPE_CHECKPOINT,
            "StableDiffusionPipeline",
        ),
        (
            "sdxl",
            model_pb2.IMAGE_BASE_MODEL_SDXL,
            model_pb2.CHECKPOINT_TYPE_CHECKPOINT,
            "StableDiffusionXLPipeline",
        ),
        (
            "sd15-file",
            model_pb2.IMAGE_BASE_MODEL_SD_1_5,
            model_pb2.CHECKPOINT_TYPE_CHECKPOINT,
            "StableDiffusionPipeline",
        ),
        (
            "sdxl-file",
            model_pb2.IMAGE_BASE_MODEL_SDXL,
            model_pb2.CHECKPOINT_TYPE_CHECKPOINT,
            "StableDiffusionXLPipeline",
        ),
        ("lora15", model_pb2.IMAGE_BASE_MODEL_SD_1_5, model_pb2.CHECKPOINT_TYPE_LORA, ""),
        ("loraxl", model_pb2.IMAGE_BASE_MODEL_SDXL, model_pb2.CHECKPOINT_TYPE_LORA, ""),
    ],
)
def test_imports_give_the_image_config(suite: Suite, name: str, base: int, kind: int, pipeline: str) -> None:
    model = suite.catalog.get_model(name)
    assert model.state == model_pb2.MODEL_STATE_READY
    assert model.kind == model_pb2.MODEL_KIND_IMAGE
    assert model.WhichOneof("config") == "image"
    image = model.image
    assert (image.base_model, image.checkpoint_type, image.pipeline_class) == (base, kind, pipeline)
    assert image.weight_format == model_pb2.WEIGHT_FORMAT_SAFETENSORS
    if name in ("sd15", "sdxl"):
        assert image.resolution == 64 and list(image.samplers) == ["EulerDiscreteScheduler"]
    if kind == model_pb2.CHECKPOINT_TYPE_LORA:
        assert (image.lora_rank, image.resolution) == (4, 64)
        assert list(image.trigger_words) == ["sks", "tinytok"]


# --------------------------------------------------------------------------- routing


@pytest.mark.parametrize("name", ["sd15", "sdxl-file", "lora15"])
def test_routing_sends_image_models_only_to_the_diffusers_worker(suite: Suite, name: str) -> None:
    found = suite.catalog.find_workers(name, worker_pb2.WORKER_ROLE_INFERENCE)
    assert [m.worker.name for m in found.matches] == ["workers/diffusers-test"]
    assert found.matches[0].worker.capabilities.engine == "diffusers"
    rejected = {m.worker.name: m for m in found.rejected}
    assert set(rejected) == {"workers/transformers-test", "workers/vllm-test"}
    for match in rejected.values():
        failed = [r for r in match.report.results if r.outcome == worker_pb2.RULE_OUTCOME_FAIL]
        assert any(r.rule == "kind" and "image" in r.message.lower() for r in failed), failed


def test_the_routed_client_reaches_the_diffusers_worker(suite: Suite) -> None:
    with InferenceClient.for_model("sd15", catalog=suite.catalog, timeout=300) as routed:
        assert routed.worker is not None and routed.worker.name == "workers/diffusers-test"
        reply = routed.generate_image("sd15", PROMPT, **FAST)
    assert reply.model == "models/sd15"
    assert reply.mime_type == "image/png" and _pixels(reply.image).shape == (64, 64, 3)


# --------------------------------------------------------------------------- generation


async def test_the_async_client_generates_the_same_image(suite: Suite) -> None:
    async with AsyncInferenceClient(suite.diffusers_server.target, timeout=300) as client:
        reply = await client.generate_image("sd15", PROMPT, **FAST)
    assert reply.image == suite.client.generate_image("sd15", PROMPT, **FAST).image


@pytest.mark.parametrize(
    ("name", "cfg_scale"), [("sd15", 7.5), ("sd15-file", 7.5), ("sdxl", 5.0), ("sdxl-file", 5.0)]
)
def test_a_seed_gives_the_same_64x64_png(suite: Suite, name: str, cfg_scale: float) -> None:
    first = suite.client.generate_image(name, PROMPT, steps=2, seed=7, request_id="img-1")
    again = suite.client.generate_image(name, PROMPT, **FAST)
    other = suite.client.generate_image(name, PROMPT, steps=2, seed=8)

    assert first.request_id == "img-1" and first.model == f"models/{name}"
    assert _pixels(first.image).shape == (64, 64, 3)
    assert first.image == again.image
    assert np.abs(_pixels(first.image) - _pixels(other.image)).max() > 0
    used = first.parameters
    # Unset parameters: the catalog entry's ImageConfig (resolution, sampler), else the pipeline's.
    assert (used.width, used.height, used.steps, used.seed) == (64, 64, 2, 7)
    assert (used.sampler, used.cfg_scale, used.clip_skip) == ("EulerDiscreteScheduler", cfg_scale, 1)
    png = Image.open(io.BytesIO(first.image))
    assert isinstance(png, PngImageFile) and png.text["parameters"].startswith(PROMPT)


def test_a_random_seed_is_returned_and_reproduces_the_image(suite: Suite) -> None:
    first = suite.client.generate_image("sd15", PROMPT, steps=2)
    again = suite.client.generate_image("sd15", PROMPT, steps=2, seed=first.parameters.seed)
    assert first.image == again.image


def test_single_file_loads_the_same_weights_as_the_folder(suite: Suite) -> None:
    folder = _pixels(suite.client.generate_image("sd15", PROMPT, **FAST).image)
    single = _pixels(suite.client.generate_image("sd15-file", PROMPT, **FAST).image)
    # The single file stores the folder's weights in float16: a rounding apart, not another model.
    assert np.abs(folder - single).max() <= 8


@pytest.mark.parametrize(("base", "lora"), [("sd15", "lora15"), ("sdxl-file", "loraxl")])
def test_a_lora_changes_the_image(suite: Suite, base: str, lora: str) -> None:
    plain = suite.client.generate_image(base, PROMPT, **FAST)
    styled = suite.client.generate_image(base, PROMPT, adapter=lora, **FAST)
    half = suite.client.generate_image(base, PROMPT, adapter=lora, adapter_scale=0.5, steps=2, seed=7)
    plain_again = suite.client.generate_image(base, PROMPT, **FAST)

    assert (styled.parameters.adapter, styled.parameters.adapter_scale) == (f"models/{lora}", 1.0)
    assert np.abs(_pixels(plain.image) - _pixels(styled.image)).max() > 0
    assert np.abs(_pixels(half.image) - _pixels(styled.image)).max() > 0
    assert plain_again.image == plain.image, "a request without the LoRA runs without it"
    loaded = {m.model: m for m in suite.client.list_loaded_models()}
    assert f"models/{lora}" in loaded[f"models/{base}"].adapters


def test_an_sdxl_lora_on_sd15_is_refused_with_the_reason(suite: Suite) -> None:
    error = _error(lambda: suite.client.generate_image("sd15", PROMPT, adapter="loraxl", **FAST))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "ADAPTER_BASE_MISMATCH"
    assert "SDXL" in error.message and "SD 1.5" in error.message
    assert error.metadata["adapter_base"] == "IMAGE_BASE_MODEL_SDXL"


def test_defaults_come_from_the_image_config(suite: Suite) -> None:
    tuned = model_pb2.Model()
    tuned.CopyFrom(suite.models["sd15"])
    tuned.image.steps = 3
    tuned.image.cfg_scale = 4.5
    tuned.image.clip_skip = 2
    del tuned.image.samplers[:]
    tuned.image.samplers.append("DDIMScheduler")
    suite.catalog.create_model("sd15-tuned", tuned)

    used = suite.client.generate_image("sd15-tuned", PROMPT, seed=1).parameters
    assert (used.steps, used.cfg_scale, used.sampler, used.clip_skip) == (3, 4.5, "DDIMScheduler", 2)
    overridden = suite.client.generate_image(
        "sd15-tuned", PROMPT, seed=1, steps=2, cfg_scale=3.0, sampler="euler_discrete", clip_skip=1
    ).parameters
    assert (overridden.steps, overridden.cfg_scale, overridden.sampler, overridden.clip_skip) == (
        2,
        3.0,
        "EulerDiscreteScheduler",
        1,
    )


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"width": 60}, "width"),
        ({"steps": 0}, "steps"),
        ({"sampler": "NoSuchScheduler"}, "sampler"),
        ({"clip_skip": 9}, "clip_skip"),
    ],
)
def test_bad_parameters_name_the_field(suite: Suite, options: dict[str, object], field: str) -> None:
    error = _error(lambda: suite.client.generate_image("sd15", PROMPT, **options))  # type: ignore[arg-type]
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [name for name, _ in error.field_violations] == [field]


def test_text_and_image_rpcs_do_not_mix(suite: Suite) -> None:
    error = _error(lambda: suite.client.generate("sd15", PROMPT, max_tokens=4))
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "IMAGE_MODEL")
    error = _error(lambda: suite.client.generate_image("lora15", PROMPT, **FAST))
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_BASE_UNKNOWN")


def test_server_lists_image_models_and_reports_the_engine(suite: Suite) -> None:
    suite.client.generate_image("sd15", PROMPT, **FAST)
    info = suite.client.get_server_info()
    assert info.capabilities.engine == "diffusers"
    assert model_pb2.IMAGE_BASE_MODEL_SDXL in info.capabilities.image_base_models
    loaded = {m.model: m for m in info.loaded_models}
    assert loaded["models/sd15"].engine == "diffusers"
    assert loaded["models/sd15"].state == pb.LOADED_MODEL_STATE_READY


# --------------------------------------------------------------------------- CLI


def test_cli_generate_image_writes_the_picture(
    suite: Suite, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MODELYARD_INFERENCE_ADDRESS", raising=False)
    routed = ["--catalog", suite.catalog_server.target, "--steps", "2"]
    out = tmp_path / "out.png"
    assert cli.main(["generate-image", "sd15", PROMPT, "-o", str(out), "--seed", "7", *routed]) == 0
    assert _pixels(out.read_bytes()).shape == (64, 64, 3)
    assert out.read_bytes() == suite.client.generate_image("sd15", PROMPT, **FAST).image
    err = capsys.readouterr().err
    assert "64x64, seed 7, 2 steps" in err and "worker " in err and f"wrote {out}" in err

    refused = [
        "generate-image",
        "sd15",
        PROMPT,
        "-o",
        str(tmp_path / "x.png"),
        "--adapter",
        "loraxl",
        *routed,
    ]
    assert cli.main(refused) == cli.EXIT_RPC_ERROR
    assert "ADAPTER_BASE_MISMATCH" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
