"""Resolve an import source string to files on this machine.

A source is one of:

* an absolute path to a model folder, or to a single `.safetensors` / `.gguf` file;
* a Hugging Face hub id `org/name[@revision]`, looked up in the HF cache (offline,
  through `huggingface_hub.snapshot_download(local_files_only=True)`) and downloaded only
  when the caller allows it and the hub answers.

Local paths are confined to the allowed roots: `..` components and symbolic links
leading outside the roots are refused with PermissionDenied
(`PATH_OUTSIDE_ALLOWED_ROOTS`) before anything is said about whether the target
exists. Pickle weights (`.bin`, `.pt`, `.ckpt`, ...) are refused with
FailedPrecondition (`PICKLE_WEIGHTS_REFUSED`) unless allowed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from catalog_service.detection.common import (
    GGUF_SUFFIX,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIX,
    is_pickle_weights,
)
from catalog_service.hashing import iter_files
from catalog_service.paths import inside, is_special, not_regular_error, outside_error, resolve_link
from modelyard.catalog.v1 import model_pb2
from server_kit.errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)

MODEL_ID_PATTERN = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
"""Valid model ids (the `{model}` of `models/{model}`)."""

HUB_ID_PATTERN = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95})(?:@(?P<revision>[A-Za-z0-9._/-]{1,255}))?$"
)
"""`org/name` or `org/name@revision` (branch, tag or commit)."""

WEIGHT_SUFFIXES: tuple[str, ...] = (SAFETENSORS_SUFFIX, GGUF_SUFFIX)


class SourceKind(StrEnum):
    """Where the files of a resolved source are."""

    LOCAL = "local"
    FILE = "file"
    HF_CACHE = "hf_cache"
    HUB_DOWNLOAD = "hub_download"


@dataclass(frozen=True)
class ResolvedSource:
    """An import source resolved to a local path.

    Attributes:
        kind: local folder, single file, HF cache snapshot or fresh hub download.
        path: resolved absolute path of the folder or file.
        source_key: normalized identity of the source (`local:/abs/path`,
            `file:/abs/file.gguf`, `hf:org/name@main`): re-imports of the same key become
            new versions.
        suggested_id: a valid model id derived from the name.
        display_name: the folder/file/repo name.
        author: the hub organisation, for hub sources.
        repo_id, revision, commit: hub facts (empty for local sources).
        allowed_roots: the folders this source's files may resolve into (for hashing).
        hub: hub metadata fetched during a download (None otherwise).
    """

    kind: SourceKind
    path: Path
    source_key: str
    suggested_id: str
    display_name: str
    author: str = ""
    repo_id: str = ""
    revision: str = ""
    commit: str = ""
    allowed_roots: tuple[Path, ...] = ()
    hub: model_pb2.HubMetadata | None = None

    def to_proto(self) -> model_pb2.ModelSource:
        """The `ModelSource` of this source (hugging_face or local)."""
        if self.repo_id:
            return model_pb2.ModelSource(
                hugging_face=model_pb2.HuggingFaceSource(
                    repo_id=self.repo_id, revision=self.revision, commit=self.commit
                )
            )
        return model_pb2.ModelSource(local=model_pb2.LocalSource(path=str(self.path)))


# --------------------------------------------------------------------------- ids


def suggest_model_id(name: str) -> str:
    """A valid model id from a free name: lowercase, invalid characters -> `-`, at most 63.

    `"Qwen/Qwen2.5-0.5B-Instruct"` -> `"qwen2-5-0-5b-instruct"` (only the part after the
    last `/`); a name with no letter to start with gets a `model-` prefix.
    """
    base = name.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (SAFETENSORS_SUFFIX, GGUF_SUFFIX):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
    if not slug or not slug[0].isalpha():
        slug = f"model-{slug}" if slug else "model"
    slug = slug[:63].rstrip("-")
    if not MODEL_ID_PATTERN.match(slug):  # defensive: should not happen
        raise InvalidArgument(f"cannot derive a model id from {name!r}", reason="INVALID_MODEL_ID")
    return slug


def versioned_id(base: str, version: int) -> str:
    """`base-v{version}`, trimming `base` so the result stays a valid id (<= 63 characters)."""
    suffix = f"-v{version}"
    return base[: 63 - len(suffix)].rstrip("-") + suffix


# --------------------------------------------------------------------------- confinement


def _roots(allowed_roots: Sequence[Path]) -> list[Path]:
    return [Path(r).expanduser().resolve() for r in allowed_roots]


def confine(path: Path | str, allowed_roots: Sequence[Path]) -> Path:
    """Resolve `path` (symlinks followed) and require it to lie inside an allowed root.

    For a folder, every file and link inside it must also resolve inside the roots.

    Raises:
        InvalidArgument: `PATH_NOT_ABSOLUTE` for a relative path.
        PermissionDenied: `PATH_OUTSIDE_ALLOWED_ROOTS` for `..` components, a path outside
            every root, or a symlink escaping them (checked before existence, so nothing is
            revealed about files outside).
        NotFound: `PATH_NOT_FOUND` when the (confined) path does not exist.
        InvalidArgument: `NOT_A_REGULAR_FILE` for a FIFO, socket or device.
    """
    text = str(path)
    candidate = Path(text).expanduser()
    if ".." in candidate.parts:
        raise outside_error(text)
    if not candidate.is_absolute():
        raise InvalidArgument(
            f"{text} is not an absolute path; give the full path of the model folder or file.",
            reason="PATH_NOT_ABSOLUTE",
            metadata={"path": text},
        )
    roots = _roots(allowed_roots)
    resolved = resolve_link(candidate, text)
    if not inside(resolved, roots):
        raise outside_error(text)
    if not resolved.exists():
        raise NotFound(f"{text} does not exist.", reason="PATH_NOT_FOUND", metadata={"path": text})
    if is_special(resolved):
        raise not_regular_error(text)
    if resolved.is_dir():
        for _ in iter_files(resolved, roots):  # raises on a link leading outside
            pass
    return resolved


# --------------------------------------------------------------------------- pickles


def pickle_only_dirs(names: Sequence[str]) -> list[str]:
    """Folders (relative, `.` for the top) whose weights are pickle files only.

    `names` are relative posix paths. A folder with a `.safetensors` or `.gguf` file next to
    its pickles is fine (the pickles are duplicates the catalog never loads).
    """
    pickles: dict[str, list[str]] = {}
    safe: set[str] = set()
    for name in names:
        folder, _, file = name.rpartition("/")
        folder = folder or "."
        lower = file.lower()
        if lower.endswith(WEIGHT_SUFFIXES):
            safe.add(folder)
        elif is_pickle_weights(file):
            pickles.setdefault(folder, []).append(name)
    return sorted(folder for folder in pickles if folder not in safe)


def _pickles_in(names: Sequence[str], folders: Sequence[str]) -> list[str]:
    """The pickle weight files among `names` that lie in `folders` (`.` for the top)."""
    return [
        n
        for n in names
        if (n.rpartition("/")[0] or ".") in folders and is_pickle_weights(n.rpartition("/")[2])
    ]


def _refuse_pickles(label: str, files: Sequence[str]) -> FailedPrecondition:
    shown = ", ".join(files[:5]) + (" ..." if len(files) > 5 else "")
    return FailedPrecondition(
        f"{label} has weights only in pickle files ({shown}); pickle can run arbitrary code when "
        "loaded. Convert the weights to .safetensors, or ask an operator to allow pickle weights.",
        reason="PICKLE_WEIGHTS_REFUSED",
        metadata={"path": label, "files": ",".join(files[:20])},
    )


def check_pickles(path: Path, names: Sequence[str] | None = None) -> None:
    """Refuse a pickle weights file, or a folder where some weights exist only as pickles."""
    if path.is_file():
        if is_pickle_weights(path.name):
            raise _refuse_pickles(path.name, [path.name])
        return
    listing = list(names) if names is not None else [rel for rel, _ in iter_files(path)]
    bad = pickle_only_dirs(listing)
    if bad:
        raise _refuse_pickles(path.name, _pickles_in(listing, bad))


# --------------------------------------------------------------------------- hub


def default_hf_cache() -> Path:
    """The HF hub cache huggingface_hub uses: `HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface"
    return base / "hub"


def parse_hub_id(text: str) -> tuple[str, str] | None:
    """`(repo_id, revision)` of `org/name[@revision]` (revision `""` when absent), else None."""
    candidate = text.removeprefix("hf://")
    match = HUB_ID_PATTERN.match(candidate)
    if match is None or ".." in candidate:
        return None
    return match.group("repo"), match.group("revision") or ""


def _from_cache(repo_id: str, revision: str, cache_dir: Path) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        found = snapshot_download(
            repo_id, revision=revision or None, cache_dir=str(cache_dir), local_files_only=True
        )
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError, ValueError):
        return None
    path = Path(str(found))
    return path if path.is_dir() else None


def _download(
    repo_id: str, revision: str, cache_dir: Path, allow_pickle: bool, endpoint: str | None
) -> tuple[Path, model_pb2.HubMetadata]:
    """Download a snapshot (pickle weights skipped when safetensors exist); raise on any hub error."""
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi(endpoint=endpoint)
    info = api.model_info(repo_id, revision=revision or None)
    names = [s.rfilename for s in (info.siblings or [])]
    if not allow_pickle:
        bad = pickle_only_dirs(names)
        if bad:
            raise _refuse_pickles(repo_id, _pickles_in(names, bad))
    ignore = (
        None if allow_pickle else [f"*{suffix}" for suffix in PICKLE_SUFFIXES]
    )  # duplicates of safetensors
    path = snapshot_download(
        repo_id,
        revision=info.sha or revision or None,
        cache_dir=str(cache_dir),
        ignore_patterns=ignore,
        endpoint=endpoint,
    )
    hub = model_pb2.HubMetadata(sha=info.sha or "")
    if isinstance(info.gated, bool):
        hub.gated = info.gated
    elif isinstance(info.gated, str):
        hub.gated = True
    if info.downloads is not None:
        hub.downloads = int(info.downloads)
    if info.likes is not None:
        hub.likes = int(info.likes)
    return Path(str(path)), hub


def _resolve_hub(
    text: str,
    repo_id: str,
    revision: str,
    cache_dir: Path,
    allow_download: bool,
    allow_pickle: bool,
    endpoint: str | None,
    allowed_roots: Sequence[Path],
) -> ResolvedSource:
    org, _, name = repo_id.partition("/")
    looked = [f"the HF cache {cache_dir}"]
    snapshot = _from_cache(repo_id, revision, cache_dir)
    kind = SourceKind.HF_CACHE
    hub: model_pb2.HubMetadata | None = None
    if snapshot is None and allow_download:
        hub_name = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        try:
            snapshot, hub = _download(repo_id, revision, cache_dir, allow_pickle, endpoint)
            kind = SourceKind.HUB_DOWNLOAD
        except FailedPrecondition:
            raise
        except Exception as exc:  # network errors, missing repos, gated repos, offline mode ...
            log.info("hub download of %s failed: %s", repo_id, exc)
            looked.append(
                f"the hub {hub_name} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            )
    elif snapshot is None:
        looked.append("the hub was not asked (downloads are not allowed for this import)")
    if snapshot is None:
        advice = f"Download it into the cache (e.g. `hf download {repo_id}`)"
        advice += "." if allow_download else ", or import with downloads allowed."
        raise NotFound(
            f"{text} was not found; looked in: " + "; ".join(looked) + ". " + advice,
            reason="MODEL_SOURCE_NOT_FOUND",
            metadata={"source": text, "cache_dir": str(cache_dir)},
        )
    repo_folder = snapshot.parent.parent
    roots = (*_roots(allowed_roots), repo_folder.resolve())
    resolved = snapshot.resolve()
    listing = [rel for rel, _ in iter_files(resolved, roots)]
    if not allow_pickle:
        check_pickles(resolved, listing)
    return ResolvedSource(
        kind=kind,
        path=resolved,
        source_key=f"hf:{repo_id.lower()}@{revision or 'main'}",
        suggested_id=suggest_model_id(name),
        display_name=name,
        author=org,
        repo_id=repo_id,
        revision=revision,
        commit=snapshot.name,
        allowed_roots=roots,
        hub=hub,
    )


# --------------------------------------------------------------------------- entry point


def resolve(
    source: str,
    *,
    allowed_roots: Sequence[Path],
    cache_dir: Path | None = None,
    allow_download: bool = False,
    allow_pickle: bool = False,
    hub_endpoint: str | None = None,
) -> ResolvedSource:
    """Resolve an import source string (see the module docstring).

    Args:
        source: absolute folder or file path, or `org/name[@revision]` (optionally `hf://`).
        allowed_roots: folders local paths must lie in (resolved, symlinks followed).
        cache_dir: HF hub cache; default `HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`.
        allow_download: contact the hub when the id is not in the cache.
        allow_pickle: accept `.bin`/`.pt`/`.ckpt` weights.
        hub_endpoint: hub URL (default `HF_ENDPOINT` or huggingface.co).

    Raises:
        InvalidArgument: `INVALID_SOURCE` (neither an absolute path nor a hub id),
            `PATH_NOT_ABSOLUTE`, `UNSUPPORTED_FILE_TYPE`.
        PermissionDenied: `PATH_OUTSIDE_ALLOWED_ROOTS`.
        NotFound: `PATH_NOT_FOUND`, `MODEL_SOURCE_NOT_FOUND` (hub id in neither cache nor hub).
        FailedPrecondition: `PICKLE_WEIGHTS_REFUSED`.
    """
    text = source.strip()
    if not text:
        raise InvalidArgument("source is empty", reason="INVALID_SOURCE")
    looks_like_path = text.startswith(("/", "~", "./", "../", "file://")) or Path(text).is_absolute()
    if not looks_like_path:
        hub_id = parse_hub_id(text)
        if hub_id is None:
            raise InvalidArgument(
                f"{text!r} is neither an absolute path nor a hub id: give the full path of a model "
                "folder or .safetensors/.gguf file, or `org/name[@revision]`.",
                reason="INVALID_SOURCE",
                metadata={"source": text},
            )
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_hf_cache()
        return _resolve_hub(
            text, hub_id[0], hub_id[1], cache, allow_download, allow_pickle, hub_endpoint, allowed_roots
        )

    path = confine(text.removeprefix("file://"), allowed_roots)
    roots = tuple(_roots(allowed_roots))
    if path.is_file():
        if not allow_pickle:
            check_pickles(path)
        if not path.name.lower().endswith(WEIGHT_SUFFIXES) and not is_pickle_weights(path.name):
            raise InvalidArgument(
                f"{path.name} is not a model file: single files must be .safetensors or .gguf.",
                reason="UNSUPPORTED_FILE_TYPE",
                metadata={"path": text},
            )
        return ResolvedSource(
            kind=SourceKind.FILE,
            path=path,
            source_key=f"file:{path.as_posix()}",
            suggested_id=suggest_model_id(path.name),
            display_name=path.name,
            allowed_roots=roots,
        )
    if not allow_pickle:
        check_pickles(path, [rel for rel, _ in iter_files(path, roots)])
    return ResolvedSource(
        kind=SourceKind.LOCAL,
        path=path,
        source_key=f"local:{path.as_posix()}",
        suggested_id=suggest_model_id(path.name),
        display_name=path.name,
        allowed_roots=roots,
    )
