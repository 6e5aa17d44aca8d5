"""`ArtifactManager`: merge a LoRA adapter into its base, export a model to GGUF.

Both follow the trainer's rule for jobs: everything is checked before compute is spent (the
catalog entries are READY, of the right kind, their files visible here, the output id free,
and llama.cpp's converter knows the architecture), then the work runs in child processes
(`tools`), then the result is imported into the catalog like any model (hashed, detected,
validated) with its lineage: a merged model's parent is the adapter, an export's parent is
the model it was made from. A failed import leaves no entry, and the output folder is
removed. One merge or export runs at a time per trainer (they are CPU- and memory-heavy);
the call answers when the model is registered.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Protocol

import grpc

from clients.errors import ModelyardRpcError
from modelyard.catalog.v1 import model_pb2
from modelyard.trainer.v1 import trainer_service_pb2 as pb
from server_kit.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    ModelyardError,
    NotFound,
    Unavailable,
)
from trainer_service.artifacts.converter import ChildFailed, LlamaCppConverter, run_child

MODEL_ID = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
TOOLS = "trainer_service.artifacts.tools"


class Catalog(Protocol):
    """What the artifact manager needs from the catalog (`AsyncCatalogClient` has it)."""

    async def get_model(self, model: str) -> model_pb2.Model:
        """Get one model."""

    async def import_model(
        self, source: str, *, timeout: float | None = 600.0, **kwargs: Any
    ) -> model_pb2.Model:
        """Import a folder or file as a model."""


def _model_ref(name: str) -> str:
    return name if name.startswith("models/") else f"models/{name}"


def _model_id(name: str) -> str:
    return name.removeprefix("models/")


def derived_id(source_id: str, suffix: str) -> str:
    """`{source}-{suffix}` as a valid model id (lowercase, dashes, at most 63 characters)."""
    tail = re.sub(r"[^a-z0-9-]+", "-", suffix.lower()).strip("-")
    head = source_id[: 62 - len(tail)].rstrip("-")
    return f"{head}-{tail}"


def _catalog_error(error: ModelyardRpcError, what: str) -> ModelyardError:
    if error.code == grpc.StatusCode.NOT_FOUND:
        return NotFound(
            f"{what} was not found in the catalog", reason="MODEL_NOT_FOUND", metadata={"model": what}
        )
    return Unavailable(
        f"the catalog could not be asked about {what}: {error.message}",
        reason="CATALOG_UNAVAILABLE",
        metadata={"model": what},
    )


class ArtifactManager:
    """Merges and exports on this trainer (domain logic; no gRPC).

    Args:
        catalog: the catalog client (None: every call answers NO_CATALOG).
        data_dir: the trainer's data folder; results go to `data_dir/artifacts/{model_id}/`.
        converter: llama.cpp's converter and quantizer.
        python: the interpreter of the merge's child process.
    """

    def __init__(
        self,
        catalog: Catalog | None,
        data_dir: Path,
        converter: LlamaCppConverter | None = None,
        python: str = sys.executable,
    ) -> None:
        self.catalog = catalog
        self.data_dir = data_dir
        self.converter = converter or LlamaCppConverter(python=python)
        self.python = python
        self._one_at_a_time = asyncio.Semaphore(1)

    # -- the two operations -------------------------------------------------------------------

    async def merge_adapter(
        self, adapter: str, output_model_id: str = "", *, validate_only: bool = False
    ) -> str:
        """Merge `adapter` into its base and register the result; returns its name ("" if validate_only)."""
        if not adapter:
            raise InvalidArgument(
                "adapter is required",
                violations=[FieldViolation("adapter", "a catalog adapter, models/{model}")],
            )
        entry = await self._ready_llm(adapter, "adapter")
        if not entry.llm.HasField("adapter"):
            raise FailedPrecondition(
                f"{entry.name} is not a LoRA adapter; only an adapter can be merged (export a full model "
                "with ExportModel)",
                reason="NOT_AN_ADAPTER",
                metadata={"model": entry.name},
            )
        base_name = entry.llm.adapter.base_model or entry.parent
        if not base_name:
            raise FailedPrecondition(
                f"the base model of {entry.name} is not in the catalog (adapter_config.json names "
                f"{entry.llm.adapter.base_model_name_or_path!r}); import the base, then the adapter again",
                reason="ADAPTER_BASE_UNKNOWN",
                metadata={"model": entry.name},
            )
        base = await self._ready_llm(base_name, "adapter")
        await self.converter.check_architecture(base.llm.architecture, entry.name)
        self._check_folder(entry)
        self._check_folder(base)
        output_id = output_model_id or derived_id(_model_id(entry.name), "merged")
        await self._check_output_free(output_id)
        if validate_only:
            return ""
        async with self._one_at_a_time:
            out_dir = self._output_dir(output_id)
            try:
                facts = await run_child(
                    [self.python, "-m", TOOLS, "merge", base.local_path, entry.local_path, str(out_dir)]
                )
            except ChildFailed as failed:
                shutil.rmtree(out_dir, ignore_errors=True)
                raise FailedPrecondition(
                    f"merging {entry.name} into {base.name} failed: {failed.detail}",
                    reason="MERGE_FAILED",
                    metadata={"model": entry.name, "base_model": base.name},
                ) from None
            return await self._register(
                out_dir,
                output_id,
                parent=entry.name,
                display_name=f"{_model_id(entry.name)} (merged)",
                description=f"{entry.name} merged into {base.name} (peft merge_and_unload, "
                f"{facts.get('dtype', 'float32')}).",
                tags=["merged"],
                labels={"merged-adapter": _model_id(entry.name), "merged-base": _model_id(base.name)},
            )

    async def export_model(
        self,
        model: str,
        export_format: int = pb.EXPORT_FORMAT_GGUF,
        quantization: str = "",
        output_model_id: str = "",
        *,
        validate_only: bool = False,
    ) -> str:
        """Export `model` to GGUF and register the file; returns its name ("" if validate_only)."""
        if export_format not in (pb.EXPORT_FORMAT_UNSPECIFIED, pb.EXPORT_FORMAT_GGUF):
            raise InvalidArgument(
                f"unsupported export format {export_format}; GGUF is the one offered",
                reason="UNSUPPORTED_EXPORT_FORMAT",
                violations=[FieldViolation("format", "EXPORT_FORMAT_GGUF")],
            )
        if not model:
            raise InvalidArgument(
                "model is required", violations=[FieldViolation("model", "a catalog model, models/{model}")]
            )
        file_type = self.converter.check_quantization(quantization)
        entry = await self._ready_llm(model, "model")
        if entry.llm.HasField("adapter"):
            raise FailedPrecondition(
                f"{entry.name} is a LoRA adapter; merge it into its base first "
                f"(modelyard models merge {_model_id(entry.name)}), then export the merged model",
                reason="EXPORT_NEEDS_MERGE",
                metadata={"model": entry.name},
            )
        if entry.llm.weight_format == model_pb2.WEIGHT_FORMAT_GGUF:
            raise FailedPrecondition(
                f"{entry.name} is already a GGUF file; serve it on a llama.cpp worker as it is",
                reason="ALREADY_GGUF",
                metadata={"model": entry.name},
            )
        await self.converter.check_architecture(entry.llm.architecture, entry.name)
        self._check_folder(entry)
        output_id = output_model_id or derived_id(_model_id(entry.name), file_type.replace("_", "-"))
        await self._check_output_free(output_id)
        if validate_only:
            return ""
        async with self._one_at_a_time:
            out_dir = self._output_dir(output_id)
            target = out_dir / f"{output_id}.{file_type}.gguf"
            try:
                await self.converter.export(Path(entry.local_path), target, file_type)
            except ChildFailed as failed:
                shutil.rmtree(out_dir, ignore_errors=True)
                raise FailedPrecondition(
                    f"llama.cpp could not export {entry.name} to GGUF {file_type}: {failed.detail}",
                    reason="EXPORT_FAILED",
                    metadata={"model": entry.name, "quantization": file_type},
                ) from None
            return await self._register(
                target,
                output_id,
                parent=entry.name,
                display_name=f"{_model_id(entry.name)} (GGUF {file_type})",
                description=f"{entry.name} exported to GGUF {file_type} by llama.cpp's converter"
                + ("" if file_type in ("f32", "f16", "bf16") else " and quantizer")
                + ".",
                tags=["gguf", file_type],
                labels={"exported-from": _model_id(entry.name), "gguf-type": file_type},
            )

    # -- checks ----------------------------------------------------------------------------------

    def _require_catalog(self) -> Catalog:
        if self.catalog is None:
            raise FailedPrecondition(
                "this trainer has no catalog configured (MODELYARD_CATALOG_ADDRESS)", reason="NO_CATALOG"
            )
        return self.catalog

    async def _ready_llm(self, name: str, field_name: str) -> model_pb2.Model:
        catalog = self._require_catalog()
        ref = _model_ref(name)
        try:
            entry = await catalog.get_model(ref)
        except ModelyardRpcError as error:
            raise _catalog_error(error, ref) from None
        if entry.state != model_pb2.MODEL_STATE_READY:
            state = model_pb2.ModelState.Name(entry.state).removeprefix("MODEL_STATE_")
            raise FailedPrecondition(
                f"{entry.name} is {state}, not READY",
                reason="MODEL_NOT_READY",
                metadata={"model": entry.name},
            )
        if entry.kind != model_pb2.MODEL_KIND_LLM:
            raise FailedPrecondition(
                f"{entry.name} is not a text-generation model; merges and GGUF exports are for LLMs",
                reason="UNSUPPORTED_MODEL_KIND",
                metadata={"model": entry.name, "field": field_name},
            )
        return entry

    def _check_folder(self, entry: model_pb2.Model) -> None:
        if not entry.local_path or not Path(entry.local_path).is_dir():
            raise FailedPrecondition(
                f"the files of {entry.name} ({entry.local_path or 'no local path'}) are not visible on this "
                "trainer; run it where the catalog's model folders are mounted",
                reason="MODEL_FILES_NOT_VISIBLE",
                metadata={"model": entry.name, "path": entry.local_path},
            )

    async def _check_output_free(self, output_id: str) -> None:
        if not MODEL_ID.match(output_id):
            raise InvalidArgument(
                f"output_model_id {output_id!r} is not a valid model id",
                violations=[
                    FieldViolation("output_model_id", "lowercase letters, digits and dashes, at most 63")
                ],
            )
        catalog = self._require_catalog()
        try:
            await catalog.get_model(_model_ref(output_id))
        except ModelyardRpcError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                return
            raise _catalog_error(error, _model_ref(output_id)) from None
        raise AlreadyExists(
            f"models/{output_id} already exists; choose another output_model_id",
            reason="MODEL_ALREADY_EXISTS",
            metadata={"model": f"models/{output_id}"},
        )

    # -- work and registration ---------------------------------------------------------------------

    def _output_dir(self, output_id: str) -> Path:
        out_dir = self.data_dir / "artifacts" / output_id
        shutil.rmtree(out_dir, ignore_errors=True)  # left by a crash: the id was free in the catalog
        out_dir.mkdir(parents=True)
        return out_dir

    async def _register(self, path: Path, output_id: str, **fields: Any) -> str:
        catalog = self._require_catalog()
        try:
            model = await catalog.import_model(str(path), model_id=output_id, **fields)
        except ModelyardRpcError as error:
            shutil.rmtree(self.data_dir / "artifacts" / output_id, ignore_errors=True)
            if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise _catalog_error(error, f"models/{output_id}") from None
            raise FailedPrecondition(
                f"the catalog refused the result as models/{output_id}: {error.message}",
                reason="REGISTRATION_FAILED",
                metadata={"model": f"models/{output_id}", "catalog_reason": error.reason},
            ) from None
        return model.name
