"""Import sources: local paths confined to the allowed roots, the HF cache, pickle refusal, hashing."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from catalog_service import sources
from catalog_service.hashing import copy_and_hash, copy_tree_and_hash, hash_files
from catalog_service.sources import SourceKind, resolve
from server_kit.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from tests.helpers import free_port


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The allowed root, holding a small model folder `root/model` (files need not be real weights)."""
    allowed = tmp_path / "allowed"
    model = allowed / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (model / "model.safetensors").write_bytes(b"\x00" * 1000)
    (model / "sub" / "extra.txt").write_text("extra", encoding="utf-8")
    return allowed


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the allowed root with a secret file."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.safetensors").write_bytes(b"secret")
    return folder


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- local sources


def test_local_folder(root: Path) -> None:
    resolved = resolve(str(root / "model"), allowed_roots=[root])
    assert resolved.kind is SourceKind.LOCAL
    assert resolved.path == (root / "model").resolve()
    assert resolved.source_key == f"local:{(root / 'model').resolve().as_posix()}"
    assert resolved.suggested_id == "model"
    assert resolved.display_name == "model"
    assert resolved.repo_id == "" and resolved.author == ""
    assert resolved.to_proto().local.path == str(resolved.path)


@pytest.mark.parametrize("name", ["Tiny_Model.V2.safetensors", "tiny-model-v2.gguf"])
def test_single_weights_file(name: str, root: Path) -> None:
    path = root / name
    path.write_bytes(b"x")
    resolved = resolve(str(path), allowed_roots=[root])
    assert resolved.kind is SourceKind.FILE
    assert resolved.path == path.resolve()
    assert resolved.source_key == f"file:{path.resolve().as_posix()}"
    assert resolved.suggested_id == "tiny-model-v2"


def test_missing_path_inside_the_roots(root: Path) -> None:
    with pytest.raises(NotFound) as caught:
        resolve(str(root / "nope"), allowed_roots=[root])
    assert caught.value.reason == "PATH_NOT_FOUND"


def test_paths_outside_the_roots_are_refused_without_saying_whether_they_exist(
    root: Path, outside: Path
) -> None:
    errors = []
    for path in (outside / "secret.safetensors", outside / "does-not-exist.safetensors"):
        with pytest.raises(PermissionDenied) as caught:
            resolve(str(path), allowed_roots=[root])
        errors.append(caught.value)
    assert all(e.reason == "PATH_OUTSIDE_ALLOWED_ROOTS" for e in errors)
    # same answer whether the file exists or not
    assert errors[0].message.replace("secret", "X") == errors[1].message.replace("does-not-exist", "X")


def test_dot_dot_components_are_refused_even_when_they_land_inside(root: Path) -> None:
    sneaky = f"{root}/model/../model"
    with pytest.raises(PermissionDenied) as caught:
        resolve(sneaky, allowed_roots=[root])
    assert caught.value.reason == "PATH_OUTSIDE_ALLOWED_ROOTS"
    with pytest.raises(PermissionDenied):
        sources.confine("../model", [root])


def test_symlink_escaping_the_roots_is_refused(root: Path, outside: Path) -> None:
    (root / "link-out").symlink_to(outside)
    with pytest.raises(PermissionDenied) as caught:
        resolve(str(root / "link-out"), allowed_roots=[root])
    assert caught.value.reason == "PATH_OUTSIDE_ALLOWED_ROOTS"


def test_symlink_inside_a_model_folder_escaping_the_roots_is_refused(root: Path, outside: Path) -> None:
    (root / "model" / "weights.safetensors").symlink_to(outside / "secret.safetensors")
    with pytest.raises(PermissionDenied) as caught:
        resolve(str(root / "model"), allowed_roots=[root])
    assert caught.value.reason == "PATH_OUTSIDE_ALLOWED_ROOTS"
    assert "secret" not in caught.value.message  # the target is not revealed
    with pytest.raises(PermissionDenied):
        hash_files(root / "model", [root])


def test_symlinks_within_the_roots_are_followed(root: Path) -> None:
    (root / "alias").symlink_to(root / "model")
    resolved = resolve(str(root / "alias"), allowed_roots=[root])
    assert resolved.path == (root / "model").resolve()


def test_relative_paths_and_garbage_are_invalid(root: Path) -> None:
    with pytest.raises(InvalidArgument) as caught:
        sources.confine("model", [root])
    assert caught.value.reason == "PATH_NOT_ABSOLUTE"
    with pytest.raises(InvalidArgument) as caught:
        resolve("not a source!", allowed_roots=[root])
    assert caught.value.reason == "INVALID_SOURCE"


def test_unsupported_single_file(root: Path) -> None:
    (root / "notes.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(InvalidArgument) as caught:
        resolve(str(root / "notes.txt"), allowed_roots=[root])
    assert caught.value.reason == "UNSUPPORTED_FILE_TYPE"


# --------------------------------------------------------------------------- pickle weights


@pytest.mark.parametrize("name", ["model.ckpt", "pytorch_model.bin", "weights.pt"])
def test_pickle_file_is_refused_unless_allowed(name: str, root: Path) -> None:
    path = root / name
    path.write_bytes(b"pickle")
    with pytest.raises(FailedPrecondition) as caught:
        resolve(str(path), allowed_roots=[root])
    assert caught.value.reason == "PICKLE_WEIGHTS_REFUSED"
    assert name in caught.value.message
    assert resolve(str(path), allowed_roots=[root], allow_pickle=True).path == path.resolve()


def test_folder_with_only_pickle_weights_is_refused(root: Path) -> None:
    folder = root / "old-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FailedPrecondition) as caught:
        resolve(str(folder), allowed_roots=[root])
    assert caught.value.reason == "PICKLE_WEIGHTS_REFUSED"
    assert "pytorch_model.bin" in caught.value.message
    assert resolve(str(folder), allowed_roots=[root], allow_pickle=True).kind is SourceKind.LOCAL


def test_pickles_beside_safetensors_are_accepted(root: Path) -> None:
    (root / "model" / "pytorch_model.bin").write_bytes(b"duplicate")
    (root / "model" / "training_args.bin").write_bytes(b"trainer state")
    assert resolve(str(root / "model"), allowed_roots=[root]).kind is SourceKind.LOCAL


def test_diffusers_component_with_only_pickles_is_refused(root: Path) -> None:
    pipeline = root / "pipeline"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "vae").mkdir()
    (pipeline / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (pipeline / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FailedPrecondition) as caught:
        resolve(str(pipeline), allowed_roots=[root])
    assert "vae/diffusion_pytorch_model.bin" in caught.value.message


# --------------------------------------------------------------------------- hub ids


@pytest.fixture
def hf_cache(tmp_path: Path, root: Path) -> tuple[Path, Path]:
    """An HF cache holding `tiny-org/tiny-llama` (main) and a `dev` branch with other content."""
    from tinymodels.hf_cache import build_hf_cache

    cache = tmp_path / "hub"
    main = build_hf_cache(cache, "tiny-org/tiny-llama", src_dir=root / "model")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "qwen2"}', encoding="utf-8")
    (other / "model.safetensors").write_bytes(b"\x01" * 10)
    build_hf_cache(cache, "tiny-org/tiny-llama", src_dir=other, ref="dev")
    return cache, main


def test_hub_id_found_in_the_hf_cache(hf_cache: tuple[Path, Path], tmp_path: Path) -> None:
    cache, snapshot = hf_cache
    resolved = resolve("tiny-org/tiny-llama", allowed_roots=[tmp_path / "nowhere"], cache_dir=cache)
    assert resolved.kind is SourceKind.HF_CACHE
    assert resolved.path == snapshot.resolve()
    assert (resolved.repo_id, resolved.revision, resolved.commit) == (
        "tiny-org/tiny-llama",
        "",
        snapshot.name,
    )
    assert resolved.author == "tiny-org"
    assert resolved.display_name == "tiny-llama"
    assert resolved.suggested_id == "tiny-llama"
    assert resolved.source_key == "hf:tiny-org/tiny-llama@main"
    proto = resolved.to_proto().hugging_face
    assert (proto.repo_id, proto.commit) == ("tiny-org/tiny-llama", snapshot.name)


def test_hub_revision_by_branch_and_by_commit(hf_cache: tuple[Path, Path], tmp_path: Path) -> None:
    cache, main = hf_cache
    dev = resolve("tiny-org/tiny-llama@dev", allowed_roots=[], cache_dir=cache)
    assert dev.commit != main.name
    assert b'"qwen2"' in (dev.path / "config.json").read_bytes()
    assert dev.source_key == "hf:tiny-org/tiny-llama@dev"
    pinned = resolve(f"tiny-org/tiny-llama@{main.name}", allowed_roots=[], cache_dir=cache)
    assert pinned.path == main.resolve()


def test_hub_cache_location_from_the_environment(
    hf_cache: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache, snapshot = hf_cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert sources.default_hf_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert sources.default_hf_cache() == cache
    assert resolve("tiny-org/tiny-llama", allowed_roots=[]).path == snapshot.resolve()


def test_hub_id_not_in_the_cache_names_the_places_looked_in(tmp_path: Path) -> None:
    cache = tmp_path / "empty-cache"
    with pytest.raises(NotFound) as caught:
        resolve("tiny-org/absent", allowed_roots=[], cache_dir=cache)
    error = caught.value
    assert error.reason == "MODEL_SOURCE_NOT_FOUND"
    assert str(cache) in error.message
    assert "not asked" in error.message  # downloads were not allowed


def test_unreachable_hub_is_reported_with_the_cache(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(NotFound) as caught:
        resolve(
            "tiny-org/absent",
            allowed_roots=[],
            cache_dir=tmp_path / "cache",
            allow_download=True,
            hub_endpoint=endpoint,
        )
    assert caught.value.reason == "MODEL_SOURCE_NOT_FOUND"
    assert endpoint in caught.value.message and str(tmp_path / "cache") in caught.value.message


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2-5-0-5b-instruct"),
        ("/models/My_Model.safetensors", "my-model"),
        ("7B", "model-7b"),
        ("---", "model"),
        ("x" * 80, "x" * 63),
    ],
)
def test_suggested_model_ids_are_valid(name: str, expected: str) -> None:
    model_id = sources.suggest_model_id(name)
    assert model_id == expected
    assert re.fullmatch(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", model_id)


def test_versioned_ids_stay_valid() -> None:
    assert sources.versioned_id("tiny-llama", 2) == "tiny-llama-v2"
    long_id = sources.versioned_id("a" * 63, 12)
    assert len(long_id) <= 63 and long_id.endswith("-v12")
    assert sources.MODEL_ID_PATTERN.match(long_id)


# --------------------------------------------------------------------------- hashing


def test_hash_files_matches_hashlib(root: Path) -> None:
    big = os.urandom(9 * 1024 * 1024 + 7)  # more than two 4 MiB chunks
    (root / "model" / "big.bin").write_bytes(big)
    files = hash_files(root / "model", [root])
    assert [f.path for f in files] == ["big.bin", "config.json", "model.safetensors", "sub/extra.txt"]
    by_path = {f.path: f for f in files}
    assert by_path["big.bin"].sha256 == _sha(big)
    assert by_path["big.bin"].size_bytes == len(big)
    for name in ("config.json", "model.safetensors", "sub/extra.txt"):
        data = (root / "model" / name).read_bytes()
        assert (by_path[name].sha256, by_path[name].size_bytes) == (_sha(data), len(data))


def test_hash_single_file(root: Path) -> None:
    (files,) = hash_files(root / "model" / "config.json")
    assert files.path == "config.json"
    assert files.sha256 == _sha((root / "model" / "config.json").read_bytes())


def test_hash_hf_snapshot_follows_links_to_blobs(hf_cache: tuple[Path, Path], root: Path) -> None:
    _cache, snapshot = hf_cache
    files = hash_files(
        snapshot, [root]
    )  # the cache itself is not an allowed root: its repo folder is implied
    assert {f.path for f in files} == {"config.json", "model.safetensors", "sub/extra.txt"}
    for f in files:
        assert f.sha256 == _sha((root / "model" / f.path).read_bytes())


def test_copy_and_hash_reads_once_and_leaves_no_partial(root: Path, tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024)
    (root / "blob.safetensors").write_bytes(data)
    entry = copy_and_hash(root / "blob.safetensors", tmp_path / "copy" / "blob.safetensors")
    assert (tmp_path / "copy" / "blob.safetensors").read_bytes() == data
    assert (entry.path, entry.size_bytes, entry.sha256) == ("blob.safetensors", len(data), _sha(data))
    assert not list((tmp_path / "copy").glob("*.partial"))

    copied = copy_tree_and_hash(root / "model", tmp_path / "tree", [root])
    assert [f.path for f in copied] == ["config.json", "model.safetensors", "sub/extra.txt"]
    assert copied == hash_files(tmp_path / "tree")


def test_default_allowed_roots_are_the_data_directory_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The working directory is no allowed root: a catalog started in `/` must not read all of `/`."""
    from catalog_service.settings import CatalogSettings

    monkeypatch.chdir(tmp_path)
    settings = CatalogSettings(data_dir=tmp_path / "data", hf_cache_dir=tmp_path / "hf")
    assert settings.resolved_allowed_roots() == [(tmp_path / "data").resolve()]
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(PermissionDenied):
        resolve(str(tmp_path / "model.safetensors"), allowed_roots=settings.resolved_allowed_roots())
