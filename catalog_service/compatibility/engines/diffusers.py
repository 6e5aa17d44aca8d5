"""diffusers: image generation pipelines (SD 1.5, SD 2.1, SDXL, SD 3, FLUX) and their add-ons.

Image models are matched by base family (`image_base_model`): an SDXL LoRA
needs a worker with SDXL pipelines. The extra `checkpoint_type` rule says how
the file is used; hypernetworks have no loader in diffusers and FAIL.
"""

from __future__ import annotations

from catalog_service.compatibility.context import (
    INFERENCE,
    Context,
    EngineTable,
    Finding,
    Rule,
    base_model_label,
    failed,
    passed,
    skipped,
    warned,
    with_article,
)
from catalog_service.compatibility.engines import register
from modelyard.catalog.v1 import model_pb2


def rule_checkpoint_type(ctx: Context) -> Finding:
    """How diffusers uses the file: a pipeline, a LoRA, an embedding or a VAE; hypernetworks fail."""
    image = ctx.image
    if image is None:
        return skipped("not an image model")
    base = base_model_label(image.base_model)
    kind = image.checkpoint_type
    if kind == model_pb2.CHECKPOINT_TYPE_CHECKPOINT:
        return passed("full pipeline checkpoint")
    if kind == model_pb2.CHECKPOINT_TYPE_LORA:
        return passed(f"LoRA, applied on {with_article(base)} pipeline with load_lora_weights")
    if kind == model_pb2.CHECKPOINT_TYPE_EMBEDDING:
        return passed(
            f"textual-inversion embedding, loaded into {with_article(base)} pipeline "
            "with load_textual_inversion"
        )
    if kind == model_pb2.CHECKPOINT_TYPE_VAE:
        return passed(f"VAE, replaces the VAE of {with_article(base)} pipeline")
    if kind == model_pb2.CHECKPOINT_TYPE_HYPERNETWORK:
        return failed("hypernetworks have no loader in diffusers; use a LoRA version of this model")
    return warned("checkpoint type is unknown (pipeline, LoRA, embedding, VAE?); cannot tell how to load it")


TABLE = register(
    EngineTable(
        name="diffusers",
        roles=frozenset({INFERENCE}),
        kinds=frozenset({model_pb2.MODEL_KIND_IMAGE}),
        weight_formats=frozenset({model_pb2.WEIGHT_FORMAT_SAFETENSORS}),
        image_base_models=frozenset(
            {
                model_pb2.IMAGE_BASE_MODEL_SD_1_5,
                model_pb2.IMAGE_BASE_MODEL_SD_2_1,
                model_pb2.IMAGE_BASE_MODEL_SDXL,
                model_pb2.IMAGE_BASE_MODEL_SDXL_REFINER,
                model_pb2.IMAGE_BASE_MODEL_SD_3,
                model_pb2.IMAGE_BASE_MODEL_FLUX,
            }
        ),
        kv_cache_tokens=0,
        extra_rules=(Rule("checkpoint_type", rule_checkpoint_type),),
    )
)
