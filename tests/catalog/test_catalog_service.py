"""The catalog through its real gRPC server and the typed client, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from clients.catalog import CatalogClient
from clients.errors import ModelyardRpcError
from modelyard.catalog.v1 import catalog_service_pb2, model_pb2, worker_pb2
from tests.helpers import grpcurl
from tests.servers import ThreadedServer
from tinymodels import diffusion, gguf_file, hf_cache, llm


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny models built once for the module (the allowed import root)."""
    root = tmp_path_factory.mktemp("models")
    llm.build_llm(root / "tiny-llama", arch="llama")
    llm.build_llm(root / "tiny-qwen2", arch="qwen2")
    llm.build_lora_adapter(root / "tiny-llama", root / "tiny-llama-lora")
    gguf_file.build_gguf(root / "gguf" / "tiny-llama.Q8_0.gguf", tensor_type="q8_0")
    hf_cache.build_hf_cache(root / "hf-cache", repo_id="tiny-org/tiny-llama", src_dir=root / "tiny-llama")
    diffusion.build_sd15_pipeline(root / "tiny-sd15")
    diffusion.build_sd_single_file(root / "single" / "tiny-sdxl.safetensors", base="sdxl")
    (root / "empty").mkdir()
    broken = root / "broken-json"
    shutil.copytree(root / "tiny-llama", broken)
    (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],,}')
    truncated = root / "truncated"
    shutil.copytree(root / "tiny-llama", truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return root


@pytest.fixture
def catalog(db_url: str, models_root: Path, tmp_path: Path) -> Iterator[CatalogClient]:
    settings = CatalogSettings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        allowed_roots=[models_root],
        hf_cache_dir=models_root / "hf-cache",
        heartbeat_ttl_seconds=30,
    )
    server = ThreadedServer(CatalogApp(settings))
    client = CatalogClient(server.target)
    try:
        yield client
    finally:
        client.close()
        server.stop()


def _code(call: Callable[..., object], *args: object, **kwargs: object) -> ModelyardRpcError:
    with pytest.raises(ModelyardRpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def test_import_llama_folder_detects_typed_config(catalog: CatalogClient, models_root: Path) -> None:
    model = catalog.import_model(str(models_root / "tiny-llama"), model_id="tiny-llama")
    assert model.name == "models/tiny-llama"
    assert model.state == model_pb2.MODEL_STATE_READY
    assert model.kind == model_pb2.MODEL_KIND_LLM
    assert model.WhichOneof("config") == "llm"
    assert model.llm.architecture == "LlamaForCausalLM"
    assert model.llm.model_type == "llama"
    assert model.llm.context_length == 256
    assert model.llm.weight_format == model_pb2.WEIGHT_FORMAT_SAFETENSORS
    assert model.llm.tokenizer.chat_template
    assert model.llm.default_temperature == pytest.approx(0.7)
    assert model.source.local.path == str((models_root / "tiny-llama").resolve())
    files = {f.path: f for f in model.files}
    assert "model.safetensors" in files and "config.json" in files
    import hashlib

    expected = hashlib.sha256((models_root / "tiny-llama" / "config.json").read_bytes()).hexdigest()
    assert files["config.json"].sha256 == expected
    assert model.size_bytes == sum(f.size_bytes for f in model.files)
    assert catalog.get_model("tiny-llama") == model


def test_reimport_gets_a_new_version_and_explicit_duplicate_is_refused(
    catalog: CatalogClient, models_root: Path
) -> None:
    first = catalog.import_model(str(models_root / "tiny-qwen2"))
    second = catalog.import_model(str(models_root / "tiny-qwen2"))
    assert first.name == "models/tiny-qwen2"
    assert second.name == "models/tiny-qwen2-v2"
    assert second.version == 2
    error = _code(catalog.import_model, str(models_root / "tiny-qwen2"), model_id="tiny-qwen2")
    assert error.code == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize(
    ("source", "code", "reason"),
    [
        ("missing-folder", grpc.StatusCode.NOT_FOUND, "PATH_NOT_FOUND"),
        ("empty", grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_MODEL_FOLDER"),
        ("broken-json", grpc.StatusCode.INVALID_ARGUMENT, "CORRUPT_JSON"),
        ("truncated", grpc.StatusCode.INVALID_ARGUMENT, "CORRUPT_WEIGHTS"),
        ("../outside", grpc.StatusCode.PERMISSION_DENIED, "PATH_OUTSIDE_ALLOWED_ROOTS"),
    ],
)
def test_bad_imports_fail_clearly_and_leave_nothing(
    catalog: CatalogClient, models_root: Path, source: str, code: grpc.StatusCode, reason: str
) -> None:
    error = _code(catalog.import_model, str(models_root / source), model_id="bad-one")
    assert error.code == code, error
    assert error.reason == reason, error
    assert error.message
    assert list(catalog.list_models()) == []
    assert _code(catalog.get_model, "bad-one").code == grpc.StatusCode.NOT_FOUND


def test_symlink_escaping_the_roots_is_refused(
    catalog: CatalogClient, models_root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside-model"
    shutil.copytree(models_root / "tiny-llama", outside)
    link = models_root / f"escape-{os.getpid()}-{threading.get_ident()}"
    link.symlink_to(outside)
    try:
        error = _code(catalog.import_model, str(link))
        assert error.code == grpc.StatusCode.PERMISSION_DENIED
        assert error.reason == "PATH_OUTSIDE_ALLOWED_ROOTS"
    finally:
        link.unlink()


def test_adapter_links_to_its_base_and_lineage_and_delete(catalog: CatalogClient, models_root: Path) -> None:
    base = catalog.import_model(str(models_root / "tiny-llama"), model_id="base")
    adapter = catalog.import_model(str(models_root / "tiny-llama-lora"), model_id="base-lora")
    assert adapter.kind == model_pb2.MODEL_KIND_LLM
    assert adapter.llm.HasField("adapter")
    assert adapter.llm.adapter.rank == 8
    assert adapter.llm.adapter.base_model == base.name
    assert adapter.parent == base.name

    lineage = catalog.get_lineage("base-lora")
    assert [m.name for m in lineage.ancestors] == ["models/base"]
    assert [m.name for m in catalog.get_lineage("base").descendants] == ["models/base-lora"]

    error = _code(catalog.delete_model, "base")
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "MODEL_HAS_DESCENDANTS"
    assert sorted(catalog.delete_model("base", force=True)) == ["models/base", "models/base-lora"]
    assert list(catalog.list_models()) == []


def test_gguf_hf_cache_and_image_imports(catalog: CatalogClient, models_root: Path) -> None:
    gguf = catalog.import_model(str(models_root / "gguf" / "tiny-llama.Q8_0.gguf"))
    assert gguf.llm.weight_format == model_pb2.WEIGHT_FORMAT_GGUF
    assert gguf.llm.architecture == "LlamaForCausalLM"
    assert gguf.llm.context_length == 256

    hub = catalog.import_model("tiny-org/tiny-llama")
    assert hub.source.hugging_face.repo_id == "tiny-org/tiny-llama"
    assert len(hub.source.hugging_face.commit) == 40
    assert hub.llm.architecture == "LlamaForCausalLM"

    missing = _code(catalog.import_model, "tiny-org/not-there")
    assert missing.code == grpc.StatusCode.NOT_FOUND
    assert "hf-cache" in missing.message

    sd = catalog.import_model(str(models_root / "tiny-sd15"))
    assert sd.kind == model_pb2.MODEL_KIND_IMAGE
    assert sd.image.base_model == model_pb2.IMAGE_BASE_MODEL_SD_1_5
    assert sd.image.pipeline_class == "StableDiffusionPipeline"

    sdxl = catalog.import_model(str(models_root / "single" / "tiny-sdxl.safetensors"))
    assert sdxl.image.base_model == model_pb2.IMAGE_BASE_MODEL_SDXL
    assert sdxl.image.checkpoint_type == model_pb2.CHECKPOINT_TYPE_CHECKPOINT


def test_list_filter_paging_update_and_etag(catalog: CatalogClient, models_root: Path) -> None:
    for i in range(3):
        catalog.import_model(
            str(models_root / "tiny-llama"), model_id=f"llama-{i}", tags=["chat"] if i else []
        )
    catalog.import_model(str(models_root / "tiny-sd15"), model_id="sd")
    assert [m.name for m in catalog.list_models(filter='kind = "LLM" AND tag = "chat"')] == [
        "models/llama-1",
        "models/llama-2",
    ]
    page = catalog.list_models_page(page_size=2)
    assert len(page.models) == 2 and page.next_page_token
    rest = catalog.list_models_page(page_size=2, page_token=page.next_page_token)
    assert [m.name for m in [*page.models, *rest.models]] == [
        "models/llama-0",
        "models/llama-1",
        "models/llama-2",
        "models/sd",
    ]
    assert _code(catalog.list_models_page, filter='colour = "red"').code == grpc.StatusCode.INVALID_ARGUMENT
    negative = _code(catalog.list_models_page, page_size=-1)
    assert negative.code == grpc.StatusCode.INVALID_ARGUMENT
    assert negative.field_violations[0][0] == "page_size"

    model = catalog.get_model("llama-0")
    model.display_name = "Llama zero"
    updated = catalog.update_model(model, ["display_name"])
    assert updated.display_name == "Llama zero" and updated.etag != model.etag
    stale = _code(catalog.update_model, model, ["display_name"])
    assert stale.code == grpc.StatusCode.ABORTED


def test_watch_model_streams_import_states(catalog: CatalogClient, models_root: Path) -> None:
    states: list[int] = []
    ready = threading.Event()

    def watch() -> None:
        with CatalogClient(catalog.address) as watcher:
            while True:  # the entry appears when the import starts
                try:
                    for change in watcher.watch_model("watched", timeout=60):
                        states.append(change.model.state)
                        if change.model.state == model_pb2.MODEL_STATE_READY:
                            ready.set()
                            return
                except ModelyardRpcError as error:
                    if error.code != grpc.StatusCode.NOT_FOUND:
                        raise
                if ready.is_set():
                    return

    with ThreadPoolExecutor(1) as pool:
        watching = pool.submit(watch)
        catalog.import_model(str(models_root / "tiny-llama"), model_id="watched")
        watching.result(timeout=60)
    assert states[-1] == model_pb2.MODEL_STATE_READY
    assert states == sorted(states)  # IMPORTING < VALIDATING < READY, in order


def test_concurrent_creates_of_one_id_exactly_one_wins(catalog: CatalogClient) -> None:
    def create(_: int) -> str:
        try:
            catalog.create_model("same", model_pb2.Model(display_name="x"))
            return "ok"
        except ModelyardRpcError as error:
            return error.code.name

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(create, range(8)))
    assert results.count("ok") == 1
    assert results.count("ALREADY_EXISTS") == 7


def test_validate_detect_and_resolve(catalog: CatalogClient, models_root: Path) -> None:
    catalog.import_model(str(models_root / "tiny-llama"), model_id="llama")
    report = catalog.validate_model("llama")
    assert report.valid
    assert {c.check for c in report.checks} >= {"required_files"} or report.checks
    detected = catalog.detect_model_type(model="llama")
    assert detected.model_type == "llama"
    assert detected.recommended_model_type == "llama"
    assert "llama" in detected.compatible_model_types

    resolved = catalog.resolve_model("llama")
    assert resolved.resolved_from == catalog_service_pb2.RESOLVED_FROM_CATALOG
    assert resolved.local_path == str((models_root / "tiny-llama").resolve())
    cached = catalog.resolve_model("tiny-org/tiny-llama")
    assert cached.resolved_from == catalog_service_pb2.RESOLVED_FROM_HF_CACHE
    missing = _code(catalog.resolve_model, "nobody/nothing")
    assert missing.code == grpc.StatusCode.NOT_FOUND
    assert "looked in" in missing.message
    # A local path is no model name: never answered as found in the HF cache.
    for path in (str(models_root / "tiny-llama"), str(models_root / "tiny-qwen2"), "/etc"):
        try:
            answer = catalog.resolve_model(path)
        except ModelyardRpcError as error:
            assert error.code == grpc.StatusCode.NOT_FOUND, error
            assert error.reason == "MODEL_NOT_RESOLVED"
        else:
            assert answer.resolved_from != catalog_service_pb2.RESOLVED_FROM_HF_CACHE


def test_workers_and_routing_through_the_api(catalog: CatalogClient, models_root: Path) -> None:
    from server_kit import capabilities

    catalog.import_model(str(models_root / "tiny-llama"), model_id="llama")
    catalog.import_model(str(models_root / "gguf" / "tiny-llama.Q8_0.gguf"), model_id="llama-gguf")
    vllm = worker_pb2.Worker(
        address="localhost:1",
        role=worker_pb2.WORKER_ROLE_INFERENCE,
        capabilities=capabilities.vllm_capabilities(),
        device=worker_pb2.Device(
            type=worker_pb2.DEVICE_TYPE_CPU, memory_bytes=8 << 30, free_memory_bytes=8 << 30
        ),
    )
    registered = catalog.register_worker("vllm-1", vllm).worker
    assert registered.state == worker_pb2.WORKER_STATE_HEALTHY
    again = catalog.register_worker("vllm-1", vllm).worker  # idempotent
    assert again.create_time == registered.create_time

    found = catalog.find_workers("llama", worker_pb2.WORKER_ROLE_INFERENCE)
    assert [m.worker.name for m in found.matches] == ["workers/vllm-1"]
    gguf = catalog.find_workers("llama-gguf", worker_pb2.WORKER_ROLE_INFERENCE)
    assert not gguf.matches
    reasons = " ".join(r.message for r in gguf.rejected[0].report.results)
    assert "llama-cpp" in reasons

    report = catalog.check_compatibility("llama-gguf", worker="vllm-1")
    assert report.verdict == worker_pb2.VERDICT_INCOMPATIBLE
    catalog.deregister_worker("vllm-1")
    assert _code(catalog.get_worker, "vllm-1").code == grpc.StatusCode.NOT_FOUND


def test_grpcurl_reads_a_model(catalog: CatalogClient, models_root: Path) -> None:
    catalog.import_model(str(models_root / "tiny-llama"), model_id="llama")
    result = grpcurl(
        catalog.address,
        "modelyard.catalog.v1.CatalogService/GetModel",
        data=json.dumps({"name": "models/llama"}),
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["model"]["llm"]["architecture"] == "LlamaForCausalLM"
    assert body["model"]["state"] == "MODEL_STATE_READY"


def test_find_workers_answers_stay_bounded_with_many_large_workers(
    catalog: CatalogClient, models_root: Path
) -> None:
    """Workers are bounded one by one; their sum in a FindWorkers answer is bounded too."""
    from catalog_service.catalog import MAX_FIND_WORKERS_BYTES

    catalog.import_model(str(models_root / "tiny-llama"), model_id="llama")
    big = worker_pb2.Worker(address="localhost:1", role=worker_pb2.WORKER_ROLE_INFERENCE)
    big.capabilities.engine = "vllm"
    big.capabilities.architectures.extend(f"Arch{n}" + "x" * 4000 for n in range(55))
    count = MAX_FIND_WORKERS_BYTES // big.ByteSize() + 5
    for index in range(count):
        catalog.register_worker(f"w-{index:03d}", big)
    found = catalog.find_workers("llama", worker_pb2.WORKER_ROLE_INFERENCE)
    assert 0 < found.ByteSize() <= MAX_FIND_WORKERS_BYTES
