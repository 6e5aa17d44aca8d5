"""What vLLM's configuration accepts but its kernels on this machine then refuse: checks a
dry run makes before any weights are loaded (`VllmEngine.dry_run`), each in the engine's own
terms. On a GPU vLLM validates most of this itself; on the CPU it does not, and the EngineCore
dies at the first step instead (see docs/compatibility-matrix.md for what each check found).
"""

from __future__ import annotations

import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def first_line(exc: BaseException) -> str:
    """An exception's message without vLLM's multi-line validation dumps."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if len(text) < 2000 else text[:2000]


def cpu_attention_backend() -> Any:
    """The attention backend vLLM's CPU platform runs every non-MLA model with (its
    `get_attn_backend_cls` returns CPU_ATTN whatever is asked), or None off the CPU."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum.CPU_ATTN.get_class()


def attention_problems(config: Any) -> list[str]:
    """Why vLLM's attention cannot run the model of `config` (a `VllmConfig`) here, in the
    backend's own terms; empty when it can (or the model has no standard attention).

    On the CPU, vLLM picks CPU_ATTN without validating it, and its kernels then refuse
    unsupported head sizes at the first forward step, killing the engine: ask the backend's
    own `supports_head_size` / `supports_dtype` first. On GPUs the backend selector
    validates the configuration itself and raises when no backend fits.
    """
    model_config = config.model_config
    if getattr(model_config, "is_attention_free", False) or getattr(model_config, "use_mla", False):
        return []
    try:
        head_size = int(model_config.get_head_size())
    except Exception:  # a model without standard attention heads
        return []
    dtype = model_config.dtype
    backend = cpu_attention_backend()
    if backend is None:
        from vllm.config import set_current_vllm_config
        from vllm.v1.attention.selector import get_attn_backend

        try:
            with set_current_vllm_config(config):
                get_attn_backend(head_size, dtype, config.cache_config.cache_dtype)
        except Exception as exc:
            return [f"no vLLM attention backend fits: {first_line(exc)}"]
        return []
    name = backend.get_name()
    problems = []
    if not backend.supports_head_size(head_size):
        sizes = ", ".join(str(n) for n in backend.get_supported_head_sizes())
        problems.append(f"{name} attention does not support head size {head_size} (supported: {sizes})")
    if not backend.supports_dtype(dtype):
        problems.append(f"{name} attention does not support {str(dtype).removeprefix('torch.')}")
    return problems


def known_limitations(config: Any) -> list[str]:
    """Limits of vLLM 0.32 that its configuration accepts but its load or first step then
    refuses at its first step, found by the conformance matrix (docs/compatibility-matrix.md);
    what the model's construction or weight loading refuses is found by
    `construction_problems` instead. Each names the engine's own error; they are checked
    against vllm(-cpu) 0.32.0 (with transformers 5.19) only."""
    from transformers import __version__ as transformers_version
    from vllm import __version__
    from vllm.platforms import current_platform

    if not str(__version__).startswith("0.32."):
        return []
    hf = config.model_config.hf_text_config
    problems = []
    model_type = getattr(hf, "model_type", "")
    if model_type == "phimoe" and str(transformers_version).startswith("5."):
        # Served through vLLM's Transformers MoE backend, whose expert layer does not fit the
        # router of transformers 5's PhimoeSparseMoeBlock (fails at the first step).
        problems.append(
            "vLLM 0.32's Transformers MoE backend cannot run transformers 5's PhiMoE block "
            "(modeling_phimoe: 'too many values to unpack (expected 3)' at the first step)"
        )
    if current_platform.is_cpu():
        for name in ("linear_key_head_dim", "linear_value_head_dim"):
            size = getattr(hf, name, None)
            if isinstance(size, int) and size % 32:
                problems.append(
                    f"vLLM's CPU gated delta-rule kernel needs {name} to be a multiple of 32, this model has "
                    f"{size} (chunk_gated_delta_rule_cpu: expect head_dim to be multiples of 32)"
                )
                break
    return problems


# vLLM layers whose forward step calls a compiled custom op (`torch.ops._C.<op>`) that not
# every vLLM build has: the CPU wheel, for one, has no Mamba-1 selective scan.
_LAYER_OPS = {
    "vllm.model_executor.layers.mamba.mamba_mixer.MambaMixer": ("selective_scan_fwd", "Mamba-1 mixer"),
}


def vllm_model_class(config: Any) -> type | None:
    """The model class vLLM runs the model of `config` (a `VllmConfig`) with, or None when its
    registry resolves none (the configuration step answers for those)."""
    from vllm.model_executor.models import ModelRegistry

    model_config = config.model_config
    try:
        model_class, _ = ModelRegistry.resolve_model_cls(model_config.architectures, model_config)
    except Exception:
        return None
    return model_class


def missing_kernels(model_class: type) -> list[str]:
    """Compiled kernels the model's vLLM class needs and this vLLM build lacks: the layer
    classes its module uses (`_LAYER_OPS`) against the ops vLLM's extension registered."""
    import torch

    module = sys.modules.get(model_class.__module__)
    problems = []
    for layer_path, (op, what) in _LAYER_OPS.items():
        layer_module, _, layer_name = layer_path.rpartition(".")
        layer = getattr(sys.modules.get(layer_module), layer_name, None)
        if layer is None or not any(value is layer for value in vars(module or object).values()):
            continue
        if not hasattr(torch.ops._C, op):
            problems.append(
                f"{model_class.__name__} runs vLLM's {what}, whose kernel {op} this vLLM build lacks "
                f"('_OpNamespace' '_C' object has no attribute '{op}')"
            )
    return problems


_META_LOCK = threading.Lock()
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
}


def construction_problems(config: Any, model_class: type, model_path: Path) -> list[str]:
    """vLLM's own model class built for `config` on PyTorch's meta device (no memory, no
    data), then fed the checkpoint's tensor names and shapes through its `load_weights`: what
    vLLM's model code refuses about this config or these weights ("'Lfm2Config' object has no
    attribute 'conv_dim'", "KeyError: 'blocks.0.ffn.experts.w13_weight'") is found here instead
    of in the EngineCore. Takes well under a second for a small model; skipped (inconclusive)
    where this process already runs torch.distributed, and an error that only the meta device
    causes counts as a pass."""
    import torch
    import torch.distributed as dist
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.model_executor.model_loader.utils import initialize_model

    if _uses_transformers_backend(model_class):
        return []
    files = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    with _META_LOCK:
        if dist.is_initialized():
            return []
        with tempfile.TemporaryDirectory(prefix="modelyard-dry-run-") as tmp:
            parallel_state.init_distributed_environment(
                world_size=1,
                rank=0,
                local_rank=0,
                distributed_init_method=f"file://{tmp}/store",
                backend="gloo",
            )
            try:
                with set_current_vllm_config(VllmConfig()):  # no model config: every group exists
                    parallel_state.ensure_model_parallel_initialized(1, 1)
                with set_current_vllm_config(config), torch.device("meta"):
                    model = initialize_model(vllm_config=config)
                    if files:
                        model.load_weights(_meta_tensors(files))
                return _router_problems(model)
            except Exception as exc:
                if "meta" in str(exc).lower():
                    return []
                return [f"vLLM's {model_class.__name__} refuses it: {type(exc).__name__}: {first_line(exc)}"]
            finally:
                parallel_state.destroy_model_parallel()
                parallel_state.destroy_distributed_environment()


def _uses_transformers_backend(model_class: type) -> bool:
    """Whether vLLM runs the model through its generic Transformers modeling backend. That
    backend builds transformers' own model class with vLLM layers swapped in, and doing so in
    this process leaves transformers' class unusable for the transformers engine next to it
    ("Current vLLM config is not set ... CustomOp"): no meta build for it (the load decides)."""
    return str(model_class.__module__).startswith("vllm.model_executor.models.transformers")


def _router_problems(model: Any) -> list[str]:
    """vLLM's CPU MoE router computes top-k with softmax scores, grouped top-k or a custom
    function, and asserts so at the first step otherwise (`CPURouter._compute_routing`): read
    the routers the built model really has."""
    try:
        from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter
    except ImportError:  # another vLLM layout: nothing to read
        return []
    for module in model.modules():
        router = getattr(module, "router", None)
        if not isinstance(router, CPURouter) or router.use_grouped_topk:
            continue
        scoring = getattr(router, "scoring_func", "softmax")
        if router.custom_routing_function is None and scoring not in ("softmax", "sqrtsoftplus"):
            return [
                f"vLLM's CPU MoE router scores experts with softmax only, this model's router uses "
                f"{scoring} (CPURouter: assert self.scoring_func == 'softmax')"
            ]
    return []


def _meta_tensors(files: list[Path]) -> Iterator[tuple[str, Any]]:
    """(name, empty meta tensor of its shape and dtype) for every tensor of the checkpoint,
    read from the safetensors headers only."""
    import torch
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                piece = handle.get_slice(name)
                dtype = getattr(torch, _SAFETENSORS_DTYPES.get(piece.get_dtype(), "float32"))
                yield name, torch.empty(piece.get_shape(), dtype=dtype, device="meta")
