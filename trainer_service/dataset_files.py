"""Dataset files: load the rows of a local file, folder, saved dataset or cached hub dataset.

A dataset is a local JSONL / JSON / Parquet file, a folder of such files (or a
folder written by `datasets.Dataset.save_to_disk`), or the name of a Hugging
Face `datasets` dataset already in the local datasets cache (never
downloaded). Paths are confined to the trainer's dataset roots; a JSONL line
that does not parse becomes an `Unparsable` row, reported by row later
(`trainer_service.datasets.check_rows`).
"""

from __future__ import annotations

import json
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server_kit.errors import FieldViolation, InvalidArgument, NotFound

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class Unparsable:
    """Placeholder for a JSONL line that is not valid JSON."""

    def __init__(self, error: str) -> None:
        self.error = error


@dataclass
class LoadedRows:
    """The rows of a dataset and where they came from."""

    rows: list[Any]
    origin: str


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _is_special(path: Path) -> bool:
    """A FIFO, socket or device (reading one blocks or never ends)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _confined(path: Path, roots: Sequence[Path]) -> Path:
    resolved = path.expanduser().resolve()
    if roots and not _inside(resolved, roots):
        raise InvalidArgument(
            f"dataset path {path} is outside the folders this trainer may read "
            f"({', '.join(str(r) for r in roots)})",
            reason="PATH_NOT_ALLOWED",
            violations=[FieldViolation("dataset.source", "outside the allowed folders")],
        )
    return resolved


def _read_jsonl(path: Path) -> list[Any]:
    rows: list[Any] = []
    with path.open("r", encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                rows.append(Unparsable(f"not valid JSON: {error.msg} at column {error.colno}"))
            except (ValueError, RecursionError) as error:  # too deep, too many digits
                rows.append(Unparsable(f"not readable JSON: {type(error).__name__}"))
    return rows


def _read_json(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        # Many ".json" datasets are JSON Lines (junk is reported row by row there).
        return _read_jsonl(path)
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) == 1:
            return list(lists[0])
    raise InvalidArgument(
        f"{path.name}: a JSON dataset is a list of row objects (or JSON Lines)",
        reason="INVALID_DATASET_FILE",
        violations=[FieldViolation("dataset.source", "a JSON file must hold a list of rows")],
    )


def _read_parquet(path: Path) -> list[Any]:
    import pyarrow.parquet as pq

    return list(pq.read_table(path).to_pylist())


def _read_file(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    if suffix in readers:
        try:
            return readers[suffix](path)
        except (ValueError, OSError) as error:  # bad UTF-8, corrupt parquet (ArrowInvalid)
            raise InvalidArgument(
                f"{path.name} cannot be read as a {suffix} dataset: {str(error)[:200]}",
                reason="INVALID_DATASET_FILE",
                violations=[FieldViolation("dataset.source", f"not a readable {suffix} file")],
            ) from error
    raise InvalidArgument(
        f"{path.name}: unsupported dataset file; use .jsonl, .json or .parquet",
        reason="UNSUPPORTED_DATASET_FILE",
        violations=[FieldViolation("dataset.source", "use a .jsonl, .json or .parquet file")],
    )


def _read_saved_dataset(path: Path, split: str) -> list[Any]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise NotFound(
                f"split {split!r} not in {path} (splits: {', '.join(loaded)})",
                reason="DATASET_SPLIT_NOT_FOUND",
            )
        loaded = loaded[split]
    return list(loaded.to_list())


def _read_cached_dataset(name: str, split: str, cache_dir: Path) -> list[Any] | None:
    """Rows of hub dataset `name` from the local datasets cache, or None when it is not there."""
    namespace_and_name = name.split("/")
    folder = cache_dir / "___".join(namespace_and_name)
    if not folder.is_dir():
        return None
    from datasets.packaged_modules.cache.cache import Cache

    try:
        builder = Cache(
            repo_id=name,
            dataset_name=namespace_and_name[-1],
            hash="auto",
            version="auto",
            cache_dir=str(cache_dir),
        )
    except ValueError:
        return None
    splits = list(builder.info.splits or [])
    if splits and split not in splits:
        raise NotFound(
            f"split {split!r} not in cached dataset {name} (splits: {', '.join(splits)})",
            reason="DATASET_SPLIT_NOT_FOUND",
        )
    return list(builder.as_dataset(split=split).to_list())


def load_rows(
    source: str,
    *,
    split: str = "",
    roots: Sequence[Path] = (),
    datasets_cache: Path | None = None,
) -> LoadedRows:
    """Load every row of `source` (see the module docstring).

    Paths must lie inside `roots` (when given). A source that is not an
    existing path is looked up as a dataset name in `datasets_cache`.
    """
    source = source.strip()
    split = split or "train"
    if not source:
        raise InvalidArgument(
            "dataset.source is required: a .jsonl/.json/.parquet file or folder, or a cached dataset name",
            reason="MISSING_FIELD",
            violations=[FieldViolation("dataset.source", "required")],
        )
    path = Path(source).expanduser()
    looks_like_path = source.startswith((".", "/", "~")) or source.lower().endswith(DATA_SUFFIXES)
    # Confinement before existence: a path outside the roots is refused whether or not it
    # exists, so the answer says nothing about files there. A bare name (`org/name`) that
    # is no path inside the roots is looked up in the datasets cache instead.
    if looks_like_path:
        resolved: Path | None = _confined(path, roots)
    else:
        candidate = path.resolve()
        resolved = candidate if not roots or _inside(candidate, roots) else None
    if resolved is not None and resolved.exists():
        if _is_special(resolved):
            raise InvalidArgument(
                f"dataset path {source} is not a regular file or folder (a FIFO, socket or device)",
                reason="NOT_A_REGULAR_FILE",
                violations=[FieldViolation("dataset.source", "not a regular file or folder")],
            )
        if resolved.is_file():
            return LoadedRows(_read_file(resolved), str(resolved))
        if (resolved / "dataset_info.json").exists() or (resolved / "dataset_dict.json").exists():
            return LoadedRows(_read_saved_dataset(resolved, split), str(resolved))
        files = sorted(p for p in resolved.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise InvalidArgument(
                f"folder {resolved} has no .jsonl, .json or .parquet files",
                reason="EMPTY_DATASET",
                violations=[FieldViolation("dataset.source", "no data files in the folder")],
            )
        rows: list[Any] = []
        for file in files:
            rows.extend(_read_file(file))
        return LoadedRows(rows, str(resolved))
    if not looks_like_path and datasets_cache is not None:
        cached = _read_cached_dataset(source, split, datasets_cache)
        if cached is not None:
            return LoadedRows(cached, f"{source} (datasets cache, split {split})")
    where = f"; no dataset named {source!r} in the datasets cache {datasets_cache}" if datasets_cache else ""
    raise NotFound(
        f"dataset {source!r} not found: no such file or folder{where if not looks_like_path else ''}",
        reason="DATASET_NOT_FOUND",
        metadata={"source": source},
    )
