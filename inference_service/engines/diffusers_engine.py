"""`DiffusersEngine`: image generation with a diffusers pipeline (`ImageEngine`).

One engine serves one image model:

* a diffusers folder (``model_index.json``) loads with
  ``DiffusionPipeline.from_pretrained(folder, local_files_only=True)``;
* a single-file checkpoint loads with ``<PipelineClass>.from_single_file(file,
  config=<local diffusers folder>)``: the config folder (``model_index.json``, the
  component configs, tokenizers and scheduler config; no weights needed) comes from
  ``MODELYARD_INFERENCE_DIFFUSERS_CONFIGS`` (`parse_single_file_configs`). Without it
  diffusers would fetch the config from the hub: Modelyard never does.

Image LoRAs (kohya or diffusers format) load with ``load_lora_weights`` under an
adapter name and are switched per request (``set_adapters`` / ``disable_lora``).

All pipeline work -- loading, LoRAs, generation -- runs on the engine's own single
thread, one request at a time (a pipeline is not thread-safe and its active LoRA and
scheduler are shared state), with ``torch.set_num_threads(threads)`` set in that thread
only (on a 2-core CPU, runs with 2 threads were seen to stall). The noise comes from a
CPU ``torch.Generator`` seeded per request, so a seed gives the same image on every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.metadata
import inspect
import io
import itertools
import logging
import re
import secrets
import threading
import types
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeAlias

from inference_service.engines.image_base import (
    ImageDefaults,
    ImageEngine,
    ImageParameters,
    ImageRequest,
    ImageResult,
    check_image_request,
)
from modelyard.catalog.v1 import model_pb2
from server_kit.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound

log = logging.getLogger("modelyard.inference")

__all__ = [
    "BASE_MODEL_KEYS",
    "BaseModel",
    "DiffusersEngine",
    "base_model_label",
    "parse_single_file_configs",
    "single_file_config",
]

BaseModel: TypeAlias = model_pb2.ImageBaseModel.ValueType
"""An `ImageBaseModel` enum value."""

BASE_MODEL_KEYS: dict[str, BaseModel] = {
    "sd15": model_pb2.IMAGE_BASE_MODEL_SD_1_5,
    "sd1": model_pb2.IMAGE_BASE_MODEL_SD_1_5,
    "sd21": model_pb2.IMAGE_BASE_MODEL_SD_2_1,
    "sd2": model_pb2.IMAGE_BASE_MODEL_SD_2_1,
    "sdxl": model_pb2.IMAGE_BASE_MODEL_SDXL,
    "sdxlrefiner": model_pb2.IMAGE_BASE_MODEL_SDXL_REFINER,
    "sd3": model_pb2.IMAGE_BASE_MODEL_SD_3,
    "flux": model_pb2.IMAGE_BASE_MODEL_FLUX,
}
"""Keys of ``MODELYARD_INFERENCE_DIFFUSERS_CONFIGS`` entries (``sd15=/configs/sd15``); the
enum names (``SD_1_5``, ``SDXL_REFINER``) work too, in any case."""

_BASE_LABELS: dict[BaseModel, str] = {
    model_pb2.IMAGE_BASE_MODEL_SD_1_5: "SD 1.5",
    model_pb2.IMAGE_BASE_MODEL_SD_2_1: "SD 2.x",
    model_pb2.IMAGE_BASE_MODEL_SDXL: "SDXL",
    model_pb2.IMAGE_BASE_MODEL_SDXL_REFINER: "SDXL refiner",
    model_pb2.IMAGE_BASE_MODEL_SD_3: "SD 3",
    model_pb2.IMAGE_BASE_MODEL_FLUX: "FLUX.1",
}

_NOT_TEXT_TO_IMAGE = ("Inpaint", "Img2Img", "Upscale", "InstructPix2Pix", "Depth2Img")
"""Pipeline class markers of pipelines that need an input image (not served by GenerateImage)."""

MAX_ERROR_CHARS = 400


def base_model_label(base: BaseModel) -> str:
    """``SD 1.5``, ``SDXL``, ...; ``an unknown base model`` for UNSPECIFIED."""
    return _BASE_LABELS.get(base, "an unknown base model")


def _base_key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower().removeprefix("image_base_model_"))


def parse_single_file_configs(items: Sequence[str]) -> dict[BaseModel, Path]:
    """``["sd15=/configs/sd15", "sdxl=/configs/sdxl"]`` -> base model -> config folder.

    Raises ValueError (a configuration error at start) for an entry without ``=``, an
    unknown base model key or a folder without ``model_index.json``.
    """
    configs: dict[BaseModel, Path] = {}
    for item in items:
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not value.strip():
            raise ValueError(f"diffusers config entry {item!r} is not BASE=FOLDER (e.g. sd15=/configs/sd15)")
        base = BASE_MODEL_KEYS.get(_base_key(key))
        if base is None:
            raise ValueError(
                f"unknown base model {key!r} in {item!r}; use one of {', '.join(BASE_MODEL_KEYS)}"
            )
        folder = Path(value.strip()).expanduser()
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"{folder} (for {key}) is not a diffusers folder: it has no model_index.json")
        configs[base] = folder
    return configs


def single_file_config(configs: Mapping[BaseModel, Path], base: BaseModel, model: str) -> Path:
    """The local config folder for a single-file checkpoint of ``base``.

    Raises FailedPrecondition ``SINGLE_FILE_CONFIG_MISSING`` saying what to configure.
    """
    folder = configs.get(base)
    if folder is not None:
        return folder
    key = next((k for k, v in BASE_MODEL_KEYS.items() if v == base), "")
    if not key:
        raise FailedPrecondition(
            f"{model} is a single-file checkpoint of an unknown base model; the base model decides "
            "which local diffusers config it loads with. Set it in the catalog (ImageConfig.base_model) "
            "or import the model as a diffusers folder",
            reason="SINGLE_FILE_CONFIG_MISSING",
            metadata={"model": model},
        )
    known = (
        ", ".join(sorted(next(k for k, v in BASE_MODEL_KEYS.items() if v == b) for b in configs)) or "none"
    )
    raise FailedPrecondition(
        f"{model} is a single-file {base_model_label(base)} checkpoint; loading it offline needs a local "
        f"diffusers config folder for {base_model_label(base)} (model_index.json, component configs, "
        f"tokenizers; weights not needed). Set MODELYARD_INFERENCE_DIFFUSERS_CONFIGS={key}=/path/to/folder "
        f"(configured: {known})",
        reason="SINGLE_FILE_CONFIG_MISSING",
        metadata={"model": model, "base_model": key},
    )


def _sampler_key(name: str) -> str:
    """`DPMSolverMultistepScheduler`, `dpm_solver_multistep`, `DPMSolverMultistep` -> one key."""
    return re.sub(r"[^a-z0-9]", "", name.lower()).removesuffix("scheduler")


def _torch_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return value


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + " ..."


@contextlib.contextmanager
def _text_model_alias(text_encoder: Any) -> Iterator[None]:
    """Let diffusers' SD clip-skip path find ``text_encoder.text_model.final_layer_norm``.

    transformers >= 5.6 moved ``final_layer_norm`` onto ``CLIPTextModel`` itself; diffusers
    0.42 still looks under ``text_model``. For the duration of one call the encoder gets a
    plain attribute (not a submodule) holding that norm. Not kept: diffusers' LoRA loader
    tells the flattened layout apart by the absence of ``text_model``.
    """
    norm = getattr(text_encoder, "final_layer_norm", None)
    if text_encoder is None or norm is None or hasattr(text_encoder, "text_model"):
        yield
        return
    object.__setattr__(text_encoder, "text_model", types.SimpleNamespace(final_layer_norm=norm))
    try:
        yield
    finally:
        object.__delattr__(text_encoder, "text_model")


class DiffusersEngine(ImageEngine):
    """A diffusers pipeline serving one image model (folder or single file) and its LoRAs.

    Args:
        path: the diffusers folder or the single ``.safetensors`` checkpoint.
        pipeline_class: pipeline class of a single file (``ImageConfig.pipeline_class``,
            e.g. ``StableDiffusionXLPipeline``); folders name theirs in model_index.json.
        single_file_config: local diffusers folder whose configs a single file loads with.
        defaults: the catalog entry's defaults (steps, CFG scale, sampler, resolution, clip skip).
        dtype: ``auto`` (float16 on CUDA, float32 on CPU), ``float32``, ``bfloat16``, ``float16``.
        device: ``cuda`` or ``cpu``; default CUDA when available.
        threads: torch threads of the engine's thread.
        model_name: the catalog name, written into the PNG's parameters.
    """

    name = "diffusers"

    def __init__(
        self,
        path: str | Path,
        *,
        pipeline_class: str = "",
        single_file_config: str | Path | None = None,
        defaults: ImageDefaults | None = None,
        dtype: str = "auto",
        device: str | None = None,
        threads: int = 1,
        model_name: str = "",
    ) -> None:
        self._path = Path(path)
        self.pipeline_class = pipeline_class
        self.single_file_config = Path(single_file_config) if single_file_config else None
        self.defaults = defaults or ImageDefaults()
        self.dtype = dtype
        self.device = device
        self.threads = max(1, threads)
        self.model_name = model_name or self._path.name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffusers")
        self._pipe: Any = None
        self._adapters: dict[str, str] = {}  # adapter id -> peft adapter name
        self._adapter_numbers = itertools.count()
        self._schedulers: dict[str, Any] = {}
        self._scheduler_classes: dict[str, Any] = {}
        self._scheduler_config: Any = None
        self._default_sampler = ""
        self._call_defaults: dict[str, Any] = {}
        self._native_size = 512
        self._size_multiple = 8
        self._text_layers: int | None = None
        self._accepts_clip_skip = False
        self._running: set[threading.Event] = set()
        self._closed = False

    # ---- properties ---------------------------------------------------------------------------

    @property
    def version(self) -> str:
        try:
            return importlib.metadata.version("diffusers")
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - diffusers is required
            return ""

    @property
    def model_path(self) -> Path:
        return self._path

    @property
    def pipeline(self) -> Any:
        """The loaded diffusers pipeline (after `start`)."""
        if self._pipe is None:
            raise FailedPrecondition("the diffusers engine is not started", reason="ENGINE_NOT_STARTED")
        return self._pipe

    # ---- lifecycle ----------------------------------------------------------------------------

    async def _on_thread(self, func: Any, *args: Any) -> Any:
        if self._closed:
            raise FailedPrecondition(f"{self.model_name} is being unloaded", reason="MODEL_NOT_LOADED")
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    async def start(self) -> None:
        await self._on_thread(self._load)

    def _load(self) -> None:
        import diffusers
        import torch

        torch.set_num_threads(self.threads)  # this thread only
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = _torch_dtype(self.dtype, device)
        if self._path.is_dir():
            pipe = diffusers.DiffusionPipeline.from_pretrained(
                str(self._path), dtype=dtype, local_files_only=True, use_safetensors=True
            )
        else:
            pipe = self._load_single_file(diffusers, dtype)
        cls_name = type(pipe).__name__
        if any(marker in cls_name for marker in _NOT_TEXT_TO_IMAGE):
            raise FailedPrecondition(
                f"{self.model_name} is a {cls_name}, which needs an input image; GenerateImage serves "
                "text-to-image pipelines",
                reason="PIPELINE_UNSUPPORTED",
                metadata={"pipeline_class": cls_name},
            )
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        self._describe(pipe)
        self._pipe = pipe
        log.info("diffusers %s loaded %s on %s (%s)", self.version, cls_name, device, dtype)

    def _load_single_file(self, diffusers: Any, dtype: Any) -> Any:
        if self.single_file_config is None:
            raise FailedPrecondition(
                f"{self.model_name} is a single-file checkpoint and no local diffusers config was given "
                "(MODELYARD_INFERENCE_DIFFUSERS_CONFIGS)",
                reason="SINGLE_FILE_CONFIG_MISSING",
            )
        cls = getattr(diffusers, self.pipeline_class, None) if self.pipeline_class else None
        if cls is None or not hasattr(cls, "from_single_file"):
            raise FailedPrecondition(
                f"{self.model_name}: pipeline class {self.pipeline_class or '(none)'} cannot load a single "
                "file with this diffusers; the catalog entry's ImageConfig.pipeline_class names it",
                reason="PIPELINE_UNSUPPORTED",
                metadata={"pipeline_class": self.pipeline_class},
            )
        kwargs: dict[str, Any] = {}
        if "safety_checker" in inspect.signature(cls.__init__).parameters:
            kwargs["safety_checker"] = None  # not part of single files; image tools run without it
        return cls.from_single_file(
            str(self._path),
            config=str(self.single_file_config),
            dtype=dtype,
            local_files_only=True,
            **kwargs,
        )

    def _describe(self, pipe: Any) -> None:
        """Read what validation and defaults need from the loaded pipeline."""
        call = inspect.signature(type(pipe).__call__).parameters
        self._call_defaults = {
            name: call[name].default
            for name in ("num_inference_steps", "guidance_scale")
            if name in call and call[name].default is not inspect.Parameter.empty
        }
        self._accepts_clip_skip = "clip_skip" in call
        factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
        self._size_multiple = factor
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
        if isinstance(sample, (list, tuple)):
            sample = sample[0]
        if isinstance(sample, int) and sample > 0:
            self._native_size = sample * factor
        layers = [
            int(encoder.config.num_hidden_layers)
            for encoder in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
            if encoder is not None and hasattr(encoder.config, "num_hidden_layers")
        ]
        self._text_layers = min(layers) if layers else None
        scheduler = pipe.scheduler
        self._scheduler_config = scheduler.config
        classes = [type(scheduler), *getattr(scheduler, "compatibles", [])]
        # Schedulers whose optional dependency is missing are dummy placeholders.
        self._scheduler_classes = {c.__name__: c for c in classes if "dummy" not in c.__module__}
        self._schedulers = {type(scheduler).__name__: scheduler}
        self._default_sampler = type(scheduler).__name__

    async def close(self) -> None:
        """Stop running requests at their next step and free the pipeline.

        Returns at once: the engine's thread drops the pipeline (after the step it may be
        in) and collects its memory in the background.
        """
        if self._closed:
            return
        self._closed = True
        for cancel in list(self._running):
            cancel.set()
        self._executor.submit(self._release)
        self._executor.shutdown(wait=False)

    def _release(self) -> None:
        self._pipe = None
        self._schedulers.clear()
        gc.collect()  # pipelines hold reference cycles: free their tensors now
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- adapters -----------------------------------------------------------------------------

    def adapters(self) -> list[str]:
        return list(self._adapters)

    async def add_adapter(self, adapter_id: str, path: str | Path) -> None:
        if adapter_id in self._adapters:
            return
        # peft adapter names become module keys: no dots or slashes.
        internal = f"lora_{next(self._adapter_numbers)}_" + re.sub(r"[^A-Za-z0-9_]", "_", adapter_id)[-40:]
        await self._on_thread(self._load_adapter, adapter_id, internal, Path(path))

    def _load_adapter(self, adapter_id: str, internal: str, path: Path) -> None:
        if adapter_id in self._adapters:
            return
        try:
            self.pipeline.load_lora_weights(str(path), adapter_name=internal)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise FailedPrecondition(
                f"LoRA {adapter_id} does not apply to {self.model_name}: {_short_error(exc)}",
                reason="ADAPTER_LOAD_FAILED",
                metadata={"adapter": adapter_id, "model": self.model_name},
            ) from exc
        self._adapters[adapter_id] = internal
        log.info("loaded image LoRA %s onto %s", adapter_id, self.model_name)

    async def remove_adapter(self, adapter_id: str) -> None:
        if adapter_id not in self._adapters:
            raise NotFound(
                f"adapter {adapter_id} is not loaded on {self.model_name}",
                reason="ADAPTER_NOT_LOADED",
                metadata={"adapter": adapter_id},
            )
        await self._on_thread(self._delete_adapter, adapter_id)

    def _delete_adapter(self, adapter_id: str) -> None:
        internal = self._adapters.pop(adapter_id, None)
        if internal is not None:
            self.pipeline.delete_adapters([internal])

    # ---- generation ---------------------------------------------------------------------------

    def resolve(self, request: ImageRequest) -> ImageParameters:
        """The parameters ``request`` runs with: request, else the entry's defaults, else the
        pipeline's; InvalidArgument for values this pipeline cannot take."""
        check_image_request(request)
        pipe = self.pipeline
        defaults = self.defaults
        size = defaults.resolution or self._native_size
        width = request.width if request.width is not None else size
        height = request.height if request.height is not None else size
        for field, value in (("width", width), ("height", height)):
            if value % self._size_multiple:
                raise InvalidArgument(
                    f"{field} must be a multiple of {self._size_multiple}, got {value}",
                    reason="INVALID_IMAGE_PARAMETERS",
                    violations=[FieldViolation(field, f"must be a multiple of {self._size_multiple}")],
                )
        clip_skip = request.clip_skip if request.clip_skip is not None else (defaults.clip_skip or 1)
        if clip_skip > 1 and not self._accepts_clip_skip:
            raise InvalidArgument(
                f"{type(pipe).__name__} has no clip skip",
                reason="INVALID_IMAGE_PARAMETERS",
                violations=[FieldViolation("clip_skip", "not supported by this pipeline")],
            )
        if self._text_layers is not None and clip_skip > self._text_layers:
            raise InvalidArgument(
                f"clip_skip must be at most {self._text_layers} (the text encoder's layers), got {clip_skip}",
                reason="INVALID_IMAGE_PARAMETERS",
                violations=[FieldViolation("clip_skip", f"must be in [1, {self._text_layers}]")],
            )
        if request.sampler:
            sampler = self._sampler_name(request.sampler)
        elif defaults.sampler in self._scheduler_classes:
            sampler = str(defaults.sampler)
        else:
            sampler = self._default_sampler
        adapter_scale = 0.0
        if request.adapter_id is not None:
            if request.adapter_id not in self._adapters:
                raise NotFound(
                    f"adapter {request.adapter_id} is not loaded on {self.model_name}",
                    reason="ADAPTER_NOT_LOADED",
                    metadata={"adapter": request.adapter_id},
                )
            adapter_scale = request.adapter_scale if request.adapter_scale is not None else 1.0
        steps = request.steps if request.steps is not None else defaults.steps
        cfg_scale = request.cfg_scale if request.cfg_scale is not None else defaults.cfg_scale
        return ImageParameters(
            steps=int(steps if steps is not None else self._default("num_inference_steps", 50)),
            cfg_scale=float(cfg_scale if cfg_scale is not None else self._default("guidance_scale", 7.5)),
            sampler=sampler,
            seed=request.seed if request.seed is not None else secrets.randbelow(2**32),
            width=width,
            height=height,
            clip_skip=clip_skip,
            adapter_id=request.adapter_id,
            adapter_scale=adapter_scale,
        )

    def _default(self, name: str, fallback: Any) -> Any:
        value = self._call_defaults.get(name)
        return fallback if value is None else value

    def _sampler_name(self, requested: str) -> str:
        wanted = _sampler_key(requested)
        for name in self._scheduler_classes:
            if _sampler_key(name) == wanted:
                return name
        available = ", ".join(sorted(self._scheduler_classes))
        raise InvalidArgument(
            f"sampler {requested!r} is not a scheduler this pipeline can use; available: {available}",
            reason="INVALID_IMAGE_PARAMETERS",
            violations=[FieldViolation("sampler", f"one of {available}")],
            metadata={"sampler": requested},
        )

    async def generate_image(self, request: ImageRequest) -> ImageResult:
        params = self.resolve(request)
        cancel = threading.Event()
        self._running.add(cancel)
        try:
            result: ImageResult = await self._on_thread(self._generate, request, params, cancel)
            return result
        except asyncio.CancelledError:
            cancel.set()  # the denoising loop stops at its next step
            raise
        finally:
            self._running.discard(cancel)

    def _scheduler(self, name: str) -> Any:
        if name not in self._schedulers:
            self._schedulers[name] = self._scheduler_classes[name].from_config(self._scheduler_config)
        return self._schedulers[name]

    def _generate(
        self, request: ImageRequest, params: ImageParameters, cancel: threading.Event
    ) -> ImageResult:
        import torch

        torch.set_num_threads(self.threads)
        pipe = self.pipeline
        pipe.scheduler = self._scheduler(params.sampler)
        if params.adapter_id is not None:
            pipe.enable_lora()
            pipe.set_adapters([self._adapters[params.adapter_id]], adapter_weights=[params.adapter_scale])
        elif self._adapters:
            pipe.disable_lora()

        def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if cancel.is_set():
                pipeline._interrupt = True
            return tensors

        kwargs: dict[str, Any] = {}
        alias: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if self._accepts_clip_skip and params.clip_skip > 1:
            kwargs["clip_skip"] = params.clip_skip - 1  # diffusers counts the layers skipped
            alias = _text_model_alias(getattr(pipe, "text_encoder", None))
        generator = torch.Generator("cpu").manual_seed(params.seed)
        with alias:
            output = pipe(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt or None,
                num_inference_steps=params.steps,
                guidance_scale=params.cfg_scale,
                width=params.width,
                height=params.height,
                generator=generator,
                callback_on_step_end=on_step_end,
                output_type="pil",
                **kwargs,
            )
        image = output.images[0]
        return ImageResult(png=self._png(image, request, params), parameters=params)

    def _png(self, image: Any, request: ImageRequest, params: ImageParameters) -> bytes:
        """PNG bytes with the parameters in a ``parameters`` text chunk (as image tools write it)."""
        from PIL.PngImagePlugin import PngInfo

        lines = [request.prompt]
        if request.negative_prompt:
            lines.append(f"Negative prompt: {request.negative_prompt}")
        details = [
            f"Steps: {params.steps}",
            f"Sampler: {params.sampler}",
            f"CFG scale: {params.cfg_scale:g}",
            f"Seed: {params.seed}",
            f"Size: {params.width}x{params.height}",
            f"Model: {self.model_name}",
            f"Clip skip: {params.clip_skip}",
        ]
        if params.adapter_id:
            details.append(f"Lora: {params.adapter_id}:{params.adapter_scale:g}")
        lines.append(", ".join(details))
        info = PngInfo()
        info.add_text("parameters", "\n".join(lines))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()
