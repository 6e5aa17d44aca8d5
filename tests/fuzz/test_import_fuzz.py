"""ImportModel of folders and files with corrupt contents: a proper status, nothing left behind.

A real tiny Llama is built once; each example copies it and replaces one of its
files with generated content (random or huge JSON, binary junk, a safetensors
header of random length and bytes, tokenizer junk), or writes a GGUF file that
is `GGUF` followed by random bytes. The catalog must answer with a status other
than INTERNAL/UNKNOWN, and a refused import must leave no model behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from modelyard.catalog.v1 import catalog_service_pb2 as pb
from modelyard.catalog.v1 import catalog_service_pb2_grpc as pb_grpc
from tests.fuzz.conftest import FUZZ, proper_status
from tests.servers import ThreadedServer
from tinymodels.llm import build_llm

HUGE_JSON = [
    b"[" * 200_000 + b"]" * 200_000,  # nesting deeper than any parser's recursion limit
    json.dumps({f"key{i}": list(range(20)) for i in range(60_000)}).encode(),  # ~5 MB, flat
    json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "x": "y" * 5_000_000}).encode(),
    b'{"model_type": "llama", "hidden_size": 1e999, "num_hidden_layers": -1}',
    b'{"model_type": ["llama"], "architectures": "LlamaForCausalLM", "vocab_size": "many"}',
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
CONFIG_KEYS = st.sampled_from(
    ["model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size", "torch_dtype",
     "max_position_embeddings", "quantization_config", "rope_scaling", "num_attention_heads", "auto_map"]
)  # fmt: skip
CONFIGS = st.one_of(
    st.dictionaries(CONFIG_KEYS, JSON_VALUES, max_size=8).map(lambda d: json.dumps(d).encode()),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=500),
    st.sampled_from(HUGE_JSON),
)
SAFETENSORS = st.builds(
    lambda length, header, tail: struct.pack("<Q", length) + header + tail,
    st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 600)),
    st.one_of(
        st.binary(max_size=300),
        st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=4).map(lambda d: json.dumps(d).encode()),
        st.just(b'{"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 999999]}}'),
        st.just(b'{"w": {"dtype": "Q9", "shape": [-1], "data_offsets": [8, 0]}}'),
    ),
    st.binary(max_size=64),
) | st.binary(max_size=7)
GGUF = st.builds(lambda rest: b"GGUF" + rest, st.binary(max_size=400)) | st.builds(
    # A plausible header (version 3, counts) followed by junk.
    lambda tensors, kvs, rest: b"GGUF" + struct.pack("<IQQ", 3, tensors, kvs) + rest,
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=200),
)
TOKENIZER_FILES = st.sampled_from(["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
SPECIAL_PLACES = st.sampled_from(
    ["source", "model.safetensors", "config.json", "tokenizer.json", "README.md", "shard"]
)
"""Where a FIFO goes: the import source itself, one of the model's files, or a shard the index names."""
SHARD_NAMES = st.one_of(
    st.sampled_from(
        [
            "../../../../../../etc/hostname",
            "/etc/hostname",
            "/dev/zero",
            "..",
            ".",
            "",
            "sub/../../x",
            "~/x",
            "model.safetensors",
            "a\x00b",
            "pipe.safetensors",
        ]
    ),
    st.text(max_size=30),
)
"""Names an index's `weight_map` gives: escapes, absolute paths, devices, FIFOs, junk."""


class Importer:
    """A catalog confined to `root`, and the tiny Llama every example starts from."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = build_llm(root / "pristine", arch="llama")
        self.server = ThreadedServer(
            CatalogApp(CatalogSettings(data_dir=root / "data", allowed_roots=[root]))
        )
        self.channel = grpc.insecure_channel(self.server.target)
        self.stub = pb_grpc.CatalogServiceStub(self.channel)
        self.count = 0

    def fresh_copy(self) -> Path:
        """A new copy of the tiny model to corrupt."""
        self.count += 1
        folder = self.root / f"case-{self.count}"
        shutil.copytree(self.model, folder)
        return folder

    def import_and_clean(self, source: Path) -> None:
        """Import `source`; any status but INTERNAL/UNKNOWN; then the catalog is empty again."""
        request = pb.ImportModelRequest(source=str(source), model_id=f"case-{self.count}")
        reply = proper_status(lambda: self.stub.ImportModel(request, timeout=120))
        if not isinstance(reply, grpc.StatusCode):
            # Junk the import tolerates (e.g. an unused tokenizer file): delete what was made.
            self.stub.DeleteModel(pb.DeleteModelRequest(name=reply.model.name, force=True), timeout=30)
        left = self.stub.ListModels(pb.ListModelsRequest(page_size=10), timeout=30).models
        assert [m.name for m in left] == [], "a refused import left a model behind"
        shutil.rmtree(source) if source.is_dir() else source.unlink()

    def close(self) -> None:
        self.channel.close()
        self.server.stop()


@pytest.fixture(scope="module")
def importer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Importer]:
    running = Importer(tmp_path_factory.mktemp("fuzz-import"))
    try:
        yield running
    finally:
        running.close()


@FUZZ
@given(content=CONFIGS)
def test_corrupt_config_json(importer: Importer, content: bytes) -> None:
    folder = importer.fresh_copy()
    (folder / "config.json").write_bytes(content)
    importer.import_and_clean(folder)


@FUZZ
@given(content=SAFETENSORS)
def test_corrupt_safetensors_header(importer: Importer, content: bytes) -> None:
    folder = importer.fresh_copy()
    (folder / "model.safetensors").write_bytes(content)
    importer.import_and_clean(folder)


@FUZZ
@given(content=GGUF)
def test_corrupt_gguf_file(importer: Importer, content: bytes) -> None:
    importer.count += 1
    path = importer.root / f"case-{importer.count}.gguf"
    path.write_bytes(content)
    importer.import_and_clean(path)


@FUZZ
@given(name=TOKENIZER_FILES, content=st.one_of(st.binary(max_size=400), CONFIGS))
def test_corrupt_tokenizer_files(importer: Importer, name: str, content: bytes) -> None:
    folder = importer.fresh_copy()
    (folder / name).write_bytes(content)
    importer.import_and_clean(folder)


def _unblock(fifo: Path) -> None:
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@FUZZ
@given(place=SPECIAL_PLACES)
def test_special_files_never_block_an_import(importer: Importer, place: str) -> None:
    folder = importer.fresh_copy()
    if place == "source":
        fifo = folder.with_suffix(".safetensors")
        shutil.rmtree(folder)
        folder = fifo
    elif place == "shard":
        fifo = folder / "pipe.safetensors"
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.embed_tokens.weight": fifo.name}}), encoding="utf-8"
        )
    else:
        fifo = folder / place
        fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    try:
        # A blocked reader would end in DEADLINE_EXCEEDED: fail on that as on INTERNAL.
        request = pb.ImportModelRequest(source=str(folder), model_id=f"case-{importer.count}")
        reply = proper_status(lambda: importer.stub.ImportModel(request, timeout=60))
        assert reply != grpc.StatusCode.DEADLINE_EXCEEDED
        if not isinstance(reply, grpc.StatusCode):
            importer.stub.DeleteModel(pb.DeleteModelRequest(name=reply.model.name, force=True), timeout=30)
    finally:
        _unblock(fifo)
    if folder.is_dir():
        shutil.rmtree(folder)
    else:
        folder.unlink()


@FUZZ
@given(shard=SHARD_NAMES)
def test_index_naming_any_path(importer: Importer, shard: str) -> None:
    folder = importer.fresh_copy()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": shard}}), encoding="utf-8"
    )
    request = pb.ImportModelRequest(source=str(folder), model_id=f"case-{importer.count}")
    reply = proper_status(lambda: importer.stub.ImportModel(request, timeout=60))
    if isinstance(reply, grpc.StatusCode):
        assert reply != grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        importer.stub.DeleteModel(pb.DeleteModelRequest(name=reply.model.name, force=True), timeout=30)
    shutil.rmtree(folder)
