"""The image engine interface the inference servicer depends on (text engines: `base.Engine`).

One `ImageEngine` serves ONE image model (a diffusers pipeline) plus the image LoRAs
added to it. Requests and results are plain dataclasses with no gRPC in them:

- `ImageRequest` -- prompt, negative prompt and every generation parameter optional
  (as in the proto ``GenerateImageRequest``), the LoRA to apply.
- `ImageDefaults` -- what the catalog entry's ``ImageConfig`` says (steps, CFG scale,
  sampler, resolution, clip skip); the engine falls back to the pipeline's own.
- `ImageResult` -- the PNG bytes and the `ImageParameters` actually used, defaults
  filled in (the seed included, chosen at random when the request had none).

`check_image_request` validates what does not depend on the pipeline (ranges); the
engine checks the rest (size multiple of the VAE scale factor, known sampler, clip skip
within the text encoder's layers).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from pathlib import Path

from server_kit.errors import FieldViolation, InvalidArgument

__all__ = [
    "MAX_CFG_SCALE",
    "MAX_IMAGE_SIDE",
    "MAX_SEED",
    "MAX_STEPS",
    "ImageDefaults",
    "ImageEngine",
    "ImageParameters",
    "ImageRequest",
    "ImageResult",
    "check_image_request",
]

MAX_STEPS = 500
"""Most denoising steps a request may ask for."""
MAX_CFG_SCALE = 100.0
"""Largest classifier-free guidance scale accepted."""
MAX_IMAGE_SIDE = 4096
"""Largest width or height in pixels."""
MAX_ADAPTER_SCALE = 10.0
"""Largest LoRA strength (in absolute value) accepted."""
MAX_SEED = 2**63 - 1
"""Largest seed (the proto field is an int64)."""


@dataclass(frozen=True)
class ImageRequest:
    """One image generation request for an `ImageEngine`; ``None`` takes the default."""

    request_id: str
    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    """A scheduler class name compatible with the pipeline, matched ignoring case,
    underscores and the ``Scheduler`` suffix (``euler_discrete`` is ``EulerDiscreteScheduler``)."""
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    clip_skip: int | None = None
    """1 uses the last text-encoder layer, 2 the one before it (the count image tools use)."""
    adapter_id: str | None = None
    """An image LoRA added with `ImageEngine.add_adapter`; ``None`` for none."""
    adapter_scale: float | None = None


@dataclass(frozen=True)
class ImageDefaults:
    """Defaults of one model, from its catalog ``ImageConfig`` (``None``: the pipeline's)."""

    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    resolution: int | None = None
    clip_skip: int | None = None


@dataclass(frozen=True)
class ImageParameters:
    """The parameters an image was generated with, defaults filled in."""

    steps: int
    cfg_scale: float
    sampler: str
    seed: int
    width: int
    height: int
    clip_skip: int
    adapter_id: str | None = None
    adapter_scale: float = 0.0


@dataclass(frozen=True)
class ImageResult:
    """A generated image: PNG bytes and the parameters used."""

    png: bytes
    parameters: ImageParameters
    mime_type: str = "image/png"


def _violation(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(
        f"{field} {description}",
        reason="INVALID_IMAGE_PARAMETERS",
        violations=[FieldViolation(field, description)],
    )


def check_image_request(request: ImageRequest) -> None:
    """Raise InvalidArgument (``INVALID_IMAGE_PARAMETERS`` or ``MISSING_FIELD``) for values
    out of range, naming the field."""
    if not request.prompt.strip():
        raise InvalidArgument(
            "prompt is required", reason="MISSING_FIELD", violations=[FieldViolation("prompt", "required")]
        )
    if request.steps is not None and not 1 <= request.steps <= MAX_STEPS:
        raise _violation("steps", f"must be in [1, {MAX_STEPS}], got {request.steps}")
    if request.cfg_scale is not None and not (
        math.isfinite(request.cfg_scale) and 0 <= request.cfg_scale <= MAX_CFG_SCALE
    ):
        raise _violation("cfg_scale", f"must be in [0, {MAX_CFG_SCALE:g}], got {request.cfg_scale}")
    if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
        raise _violation("seed", f"must be in [0, 2^63), got {request.seed}")
    for name, value in (("width", request.width), ("height", request.height)):
        if value is not None and not 1 <= value <= MAX_IMAGE_SIDE:
            raise _violation(name, f"must be in [1, {MAX_IMAGE_SIDE}] pixels, got {value}")
    if request.clip_skip is not None and request.clip_skip < 1:
        raise _violation("clip_skip", f"must be >= 1 (1 uses the last layer), got {request.clip_skip}")
    if request.adapter_scale is not None and not (
        math.isfinite(request.adapter_scale) and abs(request.adapter_scale) <= MAX_ADAPTER_SCALE
    ):
        raise _violation(
            "adapter_scale",
            f"must be in [-{MAX_ADAPTER_SCALE:g}, {MAX_ADAPTER_SCALE:g}], got {request.adapter_scale}",
        )


class ImageEngine(abc.ABC):
    """An image-generation engine serving one image model and its LoRAs.

    Lifecycle: construct (cheap, nothing loaded) -> ``await start()`` -> requests ->
    ``await close()`` (frees the model's memory; the engine cannot be restarted).
    """

    name: str
    """Engine name as reported to the catalog (``"diffusers"``)."""

    @property
    @abc.abstractmethod
    def version(self) -> str:
        """Version of the underlying library."""

    @property
    @abc.abstractmethod
    def model_path(self) -> Path:
        """Folder or single file of the model."""

    @property
    def supports_lora(self) -> bool:
        """Whether LoRAs can be added."""
        return True

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; returns when requests can be served."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Free the model's memory. Idempotent."""

    @abc.abstractmethod
    async def generate_image(self, request: ImageRequest) -> ImageResult:
        """Generate one image.

        Raises InvalidArgument for bad parameters (see `check_image_request`; also a size
        that is not a multiple of the VAE scale factor, an unknown sampler, a clip skip
        beyond the text encoder's layers) and NotFound ``ADAPTER_NOT_LOADED`` for an
        adapter that was not added. Cancelling the caller stops the denoising loop at the
        next step.
        """

    @abc.abstractmethod
    async def add_adapter(self, adapter_id: str, path: str | Path) -> None:
        """Load the image LoRA file ``path`` under ``adapter_id`` (a no-op when loaded).

        Raises FailedPrecondition ``ADAPTER_LOAD_FAILED`` when it does not fit the model.
        """

    @abc.abstractmethod
    async def remove_adapter(self, adapter_id: str) -> None:
        """Unload an adapter (NotFound ``ADAPTER_NOT_LOADED`` when it is not loaded)."""

    @abc.abstractmethod
    def adapters(self) -> list[str]:
        """Ids of the loaded adapters, in load order."""
