"""File inventories with sha256, read once.

`hash_files(root)` lists every file of a model (relative paths, sorted) with its size
and sha256, streaming each file once in 4 MiB chunks. Symlinks are followed (the HF
cache stores a snapshot's files as links into `blobs/`) but only to targets inside the
allowed roots: a link leading elsewhere is refused with PermissionDenied
(`PATH_OUTSIDE_ALLOWED_ROOTS`) without saying whether its target exists.
`copy_and_hash(src, dst)` hashes while copying, so a copied file is read once too.

Each takes an optional ``cancel`` event, checked between chunks: once it is set the
work stops with `HashingCancelled` (a cancelled import does not go on reading).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from catalog_service.paths import hf_repo_folder, inside, open_regular, resolve_link
from modelyard.catalog.v1 import model_pb2
from server_kit import errors
from server_kit.errors import InvalidArgument, PermissionDenied

__all__ = [
    "SKIPPED_DIRS",
    "HashingCancelled",
    "copy_and_hash",
    "copy_tree_and_hash",
    "hash_file",
    "hash_files",
    "hf_repo_folder",
    "iter_files",
]

CHUNK_BYTES = 4 * 1024 * 1024
"""Read size for hashing: large enough for ~2 GB/s sha256, small enough to stay in cache."""

SKIPPED_DIRS = frozenset({".git", ".cache", "__pycache__"})
"""Folders that are tooling state, not model files (git metadata, huggingface_hub local_dir cache)."""


class HashingCancelled(errors.Aborted):
    """The ``cancel`` event was set: the caller no longer wants the result."""

    def __init__(self) -> None:
        super().__init__("hashing was cancelled", reason="IMPORT_CANCELLED")


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise HashingCancelled()


def _outside(relative: str) -> PermissionDenied:
    return PermissionDenied(
        f"{relative} is a symbolic link that leads outside the allowed folders; "
        "replace it with the file itself or move the target inside an allowed root.",
        reason="PATH_OUTSIDE_ALLOWED_ROOTS",
        metadata={"path": relative},
    )


def iter_files(root: Path, allowed_roots: Sequence[Path] | None = None) -> Iterator[tuple[str, Path]]:
    """Yield `(relative posix path, real path)` for every file under `root`, sorted by path.

    `root` may be a single file (yielded under its own name). Symlinks are followed when
    they resolve inside `allowed_roots` (plus, for an HF cache snapshot, its own repo
    folder); with `allowed_roots=None` every target is accepted. Folders in
    `SKIPPED_DIRS` are not listed; a folder reached twice (a link loop) is listed once.

    Raises:
        PermissionDenied: `PATH_OUTSIDE_ALLOWED_ROOTS` for a link leading outside the roots.
        InvalidArgument: `SYMLINK_LOOP` for a link that resolves to itself.
    """
    roots: list[Path] | None = None
    if allowed_roots is not None:
        roots = [Path(r).resolve() for r in allowed_roots]
        repo = hf_repo_folder(root)
        if repo is not None:
            roots.append(repo.resolve())

    def real(path: Path, relative: str) -> Path:
        target = resolve_link(path, relative)
        if roots is not None and not inside(target, roots):
            raise _outside(relative)
        return target

    if root.is_file():
        yield root.name, real(root, root.name)
        return
    found: list[tuple[str, Path]] = []
    seen_dirs: set[Path] = set()
    pending: list[tuple[Path, str]] = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        folder_real = real(folder, prefix or ".")
        if folder_real in seen_dirs:
            continue
        seen_dirs.add(folder_real)
        with os.scandir(folder) as entries:
            for entry in entries:
                relative = f"{prefix}{entry.name}"
                path = Path(entry.path)
                if entry.is_dir(follow_symlinks=True):
                    if entry.name in SKIPPED_DIRS:
                        continue
                    pending.append((path, relative + "/"))
                elif entry.is_file(follow_symlinks=True):
                    found.append((relative, real(path, relative)))
                elif entry.is_symlink():
                    # a dangling link: refuse if it points outside, else report it as missing
                    real(path, relative)
                    raise InvalidArgument(
                        f"{relative} is a symbolic link to a file that does not exist; "
                        "the download is incomplete.",
                        reason="BROKEN_SYMLINK",
                        metadata={"path": relative},
                    )
    found.sort()
    yield from found


def hash_file(path: Path, cancel: threading.Event | None = None) -> tuple[int, str]:
    """`(size in bytes, hex sha256)` of one file, streamed in `CHUNK_BYTES` chunks
    (`HashingCancelled` between two chunks once ``cancel`` is set)."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    size = 0
    with open_regular(path, path.name) as handle:
        while True:
            _check(cancel)
            count = handle.readinto(view)
            if not count:
                break
            digest.update(view[:count])
            size += count
    return size, digest.hexdigest()


def hash_files(
    root: Path | str,
    allowed_roots: Sequence[Path] | None = None,
    cancel: threading.Event | None = None,
) -> list[model_pb2.ModelFile]:
    """Every file under `root` (or `root` itself when it is a file) with size and sha256.

    Paths are relative to `root` (a single file: its name), posix style, sorted. Each
    file is read exactly once.

    Raises:
        PermissionDenied: `PATH_OUTSIDE_ALLOWED_ROOTS` for a symlink leading outside
            `allowed_roots`.
        HashingCancelled: ``cancel`` was set (checked between chunks).
    """
    files: list[model_pb2.ModelFile] = []
    for relative, real in iter_files(Path(root), allowed_roots):
        size, sha256 = hash_file(real, cancel)
        files.append(model_pb2.ModelFile(path=relative, size_bytes=size, sha256=sha256))
    return files


def copy_and_hash(
    src: Path | str,
    dst: Path | str,
    *,
    relative_path: str | None = None,
    cancel: threading.Event | None = None,
) -> model_pb2.ModelFile:
    """Copy `src` to `dst`, hashing the bytes on the way (one read of `src`).

    The copy is written to `dst` + `.partial` and renamed into place once complete and
    flushed, so `dst` never holds half a file. Returns the file's entry with `path` set to
    `relative_path` (default: `dst`'s name).
    """
    source = Path(src)
    target = Path(dst)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    size = 0
    try:
        with open_regular(source, source.name) as reader, partial.open("wb") as writer:
            while True:
                _check(cancel)
                count = reader.readinto(view)
                if not count:
                    break
                chunk = view[:count]
                digest.update(chunk)
                writer.write(chunk)
                size += count
            writer.flush()
            os.fsync(writer.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return model_pb2.ModelFile(path=relative_path or target.name, size_bytes=size, sha256=digest.hexdigest())


def copy_tree_and_hash(
    src: Path | str,
    dst: Path | str,
    allowed_roots: Sequence[Path] | None = None,
    cancel: threading.Event | None = None,
) -> list[model_pb2.ModelFile]:
    """Copy every file under `src` into `dst` (links resolved to their content), hashing each once.

    A single-file `src` is copied to `dst / src.name`.
    """
    destination = Path(dst)
    files: list[model_pb2.ModelFile] = []
    for relative, real in iter_files(Path(src), allowed_roots):
        files.append(copy_and_hash(real, destination / relative, relative_path=relative, cancel=cancel))
    return files
