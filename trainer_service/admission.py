"""Admission of a job request: the models it names and its dataset, checked against the catalog.

`Admission` answers "can this trainer train that?" before a job is queued
(and for ValidateDataset): the base model is READY in the catalog, an LLM that
generates text, not an adapter, compatible with this trainer's engine spec,
its files visible here and its config loading; a GRPO job's reward model is a
reward model with visible files; the dataset fits the method and every row is
checked with the model's tokenizer (a few tokenizers kept loaded, at most two
validations at once). Failures raise `server_kit.errors`.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from clients.errors import ModelyardRpcError
from modelyard.catalog.v1 import model_pb2, worker_pb2
from modelyard.trainer.v1 import trainer_service_pb2 as pb
from server_kit.errors import AlreadyExists, FailedPrecondition, FieldViolation
from trainer_service import datasets as ds
from trainer_service.job_checks import catalog_error, check_llm_task

if TYPE_CHECKING:
    from trainer_service.manager import Catalog, ManagerConfig


def dataset_format(value: int) -> ds.DatasetFormat | None:
    """The domain format of a proto `DatasetFormat` value (None: detect it)."""
    if value == pb.DATASET_FORMAT_UNSPECIFIED:
        return None
    return ds.DatasetFormat(pb.DatasetFormat.Name(value).removeprefix("DATASET_FORMAT_"))  # type: ignore[arg-type]


class Admission:
    """Checks the models and dataset of a job request (see the module docstring)."""

    def __init__(self, catalog: Catalog | None, config: ManagerConfig) -> None:
        self.catalog = catalog
        self.config = config
        self._tokenizers: OrderedDict[str, Any] = OrderedDict()
        self._tokenizer_lock = threading.Lock()
        self._validations = asyncio.Semaphore(2)

    async def usable_model(
        self, name: str, field_name: str = "job.base_model", *, reward: bool = False
    ) -> model_pb2.Model:
        """The catalog entry of a base model this trainer can train (or, with `reward`, a reward model)."""
        if self.catalog is None:
            raise FailedPrecondition(
                "this trainer has no catalog configured (MODELYARD_CATALOG_ADDRESS), so it cannot resolve "
                f"{name}",
                reason="NO_CATALOG",
            )
        model_ref = name if name.startswith("models/") else f"models/{name}"
        try:
            base = await self.catalog.get_model(model_ref)
        except ModelyardRpcError as error:
            raise catalog_error(error, model_ref) from None
        if base.state != model_pb2.MODEL_STATE_READY:
            state = model_pb2.ModelState.Name(base.state).removeprefix("MODEL_STATE_")
            raise FailedPrecondition(
                f"{base.name} is {state}, not READY",
                reason="BASE_MODEL_NOT_READY",
                metadata={"model": base.name},
            )
        if base.kind != model_pb2.MODEL_KIND_LLM:
            raise FailedPrecondition(
                f"{base.name} is not a text-generation model; the trainer fine-tunes LLMs",
                reason="UNSUPPORTED_MODEL_KIND",
                metadata={"model": base.name, "kind": model_pb2.ModelKind.Name(base.kind)},
            )
        check_llm_task(base, reward=reward, field_name=field_name)
        if base.llm.HasField("adapter"):
            raise FailedPrecondition(
                f"{base.name} is a LoRA adapter; train on its base model "
                f"({base.parent or 'unknown'}) instead",
                reason="BASE_MODEL_IS_ADAPTER",
                metadata={"model": base.name},
            )
        if reward:  # only loaded to score completions: its files and config are what matters
            await asyncio.to_thread(self.check_model_files, base)
            return base
        try:
            report = await self.catalog.check_compatibility(base.name, engine_spec=self.config.engine_spec)
        except ModelyardRpcError as error:
            raise catalog_error(error, base.name) from None
        if report.verdict == worker_pb2.VERDICT_INCOMPATIBLE:
            failed = [r for r in report.results if r.outcome == worker_pb2.RULE_OUTCOME_FAIL]
            raise FailedPrecondition(
                f"{base.name} cannot be trained by this trainer: "
                + "; ".join(f"{r.rule}: {r.message}" for r in failed),
                reason="INCOMPATIBLE_MODEL",
                metadata={"model": base.name, "rules": ",".join(r.rule for r in failed)},
            )
        await asyncio.to_thread(self.check_model_files, base)
        return base

    def check_model_files(self, base: model_pb2.Model) -> None:
        path = Path(base.local_path)
        if not base.local_path or not path.is_dir():
            raise FailedPrecondition(
                f"the files of {base.name} ({base.local_path or 'no path'}) are not visible to this trainer; "
                "share the catalog's model storage with it",
                reason="MODEL_FILES_UNAVAILABLE",
                metadata={"model": base.name, "path": base.local_path},
            )
        if base.llm.requires_remote_code and not self.config.allow_remote_code:
            raise FailedPrecondition(
                f"{base.name} needs trust_remote_code, which this trainer does not allow",
                reason="REMOTE_CODE_NOT_ALLOWED",
                metadata={"model": base.name},
            )
        from transformers import AutoConfig, PretrainedConfig

        try:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=self.config.allow_remote_code)
        except Exception as error:
            raise FailedPrecondition(
                f"the config of {base.name} does not load: {error}",
                reason="MODEL_CONFIG_INVALID",
                metadata={"model": base.name},
            ) from error
        if not isinstance(config, PretrainedConfig):
            raise FailedPrecondition(
                f"the config of {base.name} loads as {type(config).__name__}, not a transformers config",
                reason="MODEL_CONFIG_INVALID",
                metadata={"model": base.name},
            )

    def _tokenizer(self, path: Path) -> Any:
        """The tokenizer at `path` (a few kept loaded: validation tokenizes every row)."""
        from trainer_service.strategies.base import load_tokenizer

        key = str(path)
        with self._tokenizer_lock:
            if key in self._tokenizers:
                self._tokenizers.move_to_end(key)
                return self._tokenizers[key]
        tokenizer = load_tokenizer(path, allow_remote_code=self.config.allow_remote_code)
        with self._tokenizer_lock:
            self._tokenizers[key] = tokenizer
            while len(self._tokenizers) > 4:
                self._tokenizers.popitem(last=False)
        return tokenizer

    async def validate(
        self,
        dataset: pb.Dataset,
        method: ds.Method,
        model_path: Path | None,
        max_seq_length: int,
        *,
        extra_fields: tuple[str, ...] = (),
    ) -> ds.ValidatedDataset:
        def work() -> ds.ValidatedDataset:
            tokenizer = self._tokenizer(model_path) if model_path is not None else None
            return ds.validate_dataset(
                dataset.source,
                method,
                fmt=dataset_format(dataset.format),
                split=dataset.split,
                tokenizer=tokenizer,
                max_seq_length=max_seq_length,
                roots=self.config.dataset_roots,
                datasets_cache=self.config.datasets_cache,
                extra_fields=extra_fields,
            )

        async with self._validations:
            return await asyncio.to_thread(work)

    def stored_source(self, source: str) -> str:
        """The dataset source as the worker will read it: absolute for paths, as given for names."""
        path = Path(source).expanduser()
        return str(path.resolve()) if path.exists() else source

    async def check_output_free(self, model_id: str) -> None:
        assert self.catalog is not None
        try:
            existing = await self.catalog.get_model(model_id)
        except ModelyardRpcError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                return
            raise catalog_error(error, f"models/{model_id}") from None
        raise AlreadyExists(
            f"the output model {existing.name} already exists in the catalog; choose another output_model_id",
            reason="OUTPUT_MODEL_EXISTS",
            metadata={"model": existing.name},
            violations=[FieldViolation("job.output_model_id", "already in the catalog")],
        )
