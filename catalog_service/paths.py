"""Path confinement, shared by request paths and by paths named inside model files.

One rule for every path the catalog follows: a request path (`sources.confine`) and a
path read from a file's contents (a `model.safetensors.index.json` shard, a diffusers
component folder, a sidecar) both refuse `..` components and resolve symlinks before
checking where they land, and nothing is opened that is not a regular file (a FIFO
would block the reading thread forever; a device could be read without end).

* `inside` / `outside_error`: the check and the `PATH_OUTSIDE_ALLOWED_ROOTS` error.
* `named_path(folder, name, base=...)`: a relative name read from a model file, joined to
  `folder`; it must be relative, free of `..`, and resolve inside the model's own folder
  (`base`; for an HF cache snapshot, its repo folder, where the blobs are) or inside
  `roots` when those are given.
* `open_regular(path)`: open for reading without blocking, and only a regular file
  (`NOT_A_REGULAR_FILE` otherwise).

Error messages name paths, never bytes read from files.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from server_kit.errors import InvalidArgument, PermissionDenied


def inside(path: Path, roots: Sequence[Path]) -> bool:
    """Whether `path` is one of `roots` or lies under one (no resolution: resolve first)."""
    return any(path == root or path.is_relative_to(root) for root in roots)


def outside_error(text: str) -> PermissionDenied:
    """`PATH_OUTSIDE_ALLOWED_ROOTS` for `text` (a path as the caller or the file gave it)."""
    return PermissionDenied(
        f"{text} is outside the folders the catalog may read (its allowed roots); "
        "put the model inside an allowed root or ask an operator to add its folder.",
        reason="PATH_OUTSIDE_ALLOWED_ROOTS",
        metadata={"path": text[:1024]},
    )


def hf_repo_folder(path: Path) -> Path | None:
    """The `models--org--name` folder when `path` is a snapshot `.../snapshots/<commit>` of an HF cache."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith(("models--", "datasets--")):
        return path.parent.parent
    return None


def resolve_link(path: Path, label: str) -> Path:
    """`path` resolved (symlinks followed, need not exist); `SYMLINK_LOOP` on a loop."""
    try:
        return path.resolve(strict=False)
    except (RuntimeError, OSError) as exc:
        raise InvalidArgument(
            f"{label} is a symbolic link loop.", reason="SYMLINK_LOOP", metadata={"path": label}
        ) from exc


def model_roots(base: Path) -> list[Path]:
    """Where files named inside the model at `base` may resolve: its folder, plus the HF repo folder."""
    folder = base if base.is_dir() else base.parent
    roots = [folder.resolve()]
    repo = hf_repo_folder(folder)
    if repo is not None:
        roots.append(repo.resolve())
    return roots


def named_path(
    folder: Path, name: str, *, base: Path | None = None, roots: Sequence[Path] | None = None
) -> Path:
    """`folder / name` for a `name` read from a model file, confined like a request path.

    Args:
        folder: the folder the naming file is in (`name` is relative to it).
        name: the relative path the file gives (a shard, a component folder).
        base: the model's own folder; the result must resolve inside it (or its HF cache
            repo folder). Default: `folder`.
        roots: resolve inside these instead (already resolved allowed roots).

    Raises:
        PermissionDenied: `PATH_OUTSIDE_ALLOWED_ROOTS` for an absolute name, a `..`
            component, or a symlink leading outside (before anything is opened).
    """
    shown = name[:200]
    relative = Path(name)
    if not name or "\x00" in name or relative.is_absolute() or ".." in relative.parts or name.startswith("~"):
        raise outside_error(shown)
    allowed = list(roots) if roots is not None else model_roots(base if base is not None else folder)
    candidate = folder / relative
    if not inside(resolve_link(candidate, shown), allowed):
        raise outside_error(shown)
    return candidate


def not_regular_error(label: str) -> InvalidArgument:
    """`NOT_A_REGULAR_FILE` for `label`."""
    return InvalidArgument(
        f"{label} is not a regular file (a FIFO, socket or device); only regular files and folders are read.",
        reason="NOT_A_REGULAR_FILE",
        metadata={"path": label[:1024]},
    )


def is_special(path: Path) -> bool:
    """Whether `path` exists and is neither a regular file nor a folder (symlinks followed)."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def open_regular(path: Path, label: str | None = None) -> io.BufferedReader:
    """Open `path` for binary reading; only a regular file, and without ever blocking on a FIFO.

    Raises:
        InvalidArgument: `NOT_A_REGULAR_FILE` for a FIFO, socket, device or folder.
        OSError: when the file cannot be opened (missing, no permission).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise not_regular_error(label or path.name)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
