"""Lay out a real Hugging Face hub cache entry from a local folder (no network).

The layout is the one ``huggingface_hub`` writes itself::

    cache_root/models--<org>--<name>/
        blobs/<sha256 for LFS-like files | git blob sha1 for small text files>
        snapshots/<40-hex commit>/<relative path>  -> ../../blobs/<hash>   (relative symlinks)
        refs/main                                    (contains the commit hash)

so ``huggingface_hub.snapshot_download(repo_id, cache_dir=cache_root, local_files_only=True)``,
``hf_hub_download(..., local_files_only=True)``, ``scan_cache_dir(cache_root)`` and
``from_pretrained(repo_id, cache_dir=cache_root, local_files_only=True)`` (or with
``HF_HUB_OFFLINE=1``) all resolve it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

LFS_SUFFIXES: tuple[str, ...] = (
    ".safetensors",
    ".bin",
    ".gguf",
    ".pt",
    ".pth",
    ".ckpt",
    ".onnx",
    ".msgpack",
    ".h5",
)
"""Files stored as LFS on the hub: their blob name is the sha256 of the content."""

LFS_MIN_SIZE = 10 * 1024 * 1024
"""Any file at least this large is treated as LFS too."""


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content (what the hub uses for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _blob_hash(path: Path) -> str:
    size = path.stat().st_size
    if path.suffix in LFS_SUFFIXES or size >= LFS_MIN_SIZE:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    return git_blob_sha1(path.read_bytes())


def repo_folder_name(repo_id: str, repo_type: str = "model") -> str:
    """``"tiny-org/tiny-llama"`` -> ``"models--tiny-org--tiny-llama"``."""
    return f"{repo_type}s--" + repo_id.replace("/", "--")


def build_hf_cache(
    cache_root: str | Path,
    repo_id: str = "tiny-org/tiny-llama",
    src_dir: str | Path | None = None,
    revision_hash: str | None = None,
    *,
    ref: str = "main",
    repo_type: str = "model",
) -> Path:
    """Copy the files of ``src_dir`` into a hub cache under ``cache_root``; return the snapshot.

    Args:
        cache_root: the cache directory (what ``HF_HUB_CACHE`` / ``cache_dir=`` point to).
        repo_id: ``"org/name"``.
        src_dir: folder whose files (recursively) become the repo content.  Required.
        revision_hash: 40-hex commit id; by default a deterministic sha1 of the file list
            and blob hashes (so the same content gives the same commit).
        ref: branch name written under ``refs/``.
        repo_type: ``"model"``, ``"dataset"`` or ``"space"``.

    Returns:
        The snapshot folder ``cache_root/models--org--name/snapshots/<commit>``.
    """
    if src_dir is None:
        raise ValueError("src_dir is required")
    src = Path(src_dir)
    if not src.is_dir():
        raise NotADirectoryError(src)
    if revision_hash is not None and (
        len(revision_hash) != 40 or any(c not in "0123456789abcdef" for c in revision_hash)
    ):
        raise ValueError("revision_hash must be 40 lowercase hex characters")

    repo_dir = Path(cache_root) / repo_folder_name(repo_id, repo_type)
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)

    files = sorted(p for p in src.rglob("*") if p.is_file())
    entries: list[tuple[str, str]] = []  # (relative posix path, blob hash)
    for file in files:
        blob_hash = _blob_hash(file)
        blob_path = blobs / blob_hash
        if not blob_path.exists():
            shutil.copyfile(file, blob_path)
        entries.append((file.relative_to(src).as_posix(), blob_hash))

    commit = (
        revision_hash
        or hashlib.sha1("\n".join(f"{rel} {blob}" for rel, blob in entries).encode("utf-8")).hexdigest()
    )
    snapshot = repo_dir / "snapshots" / commit
    for rel, blob_hash in entries:
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        target = os.path.relpath(blobs / blob_hash, link.parent)
        link.symlink_to(target)

    refs = repo_dir / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / ref).write_text(commit, encoding="utf-8")  # no trailing newline, like huggingface_hub
    return snapshot
