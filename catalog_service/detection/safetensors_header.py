"""Read safetensors headers without loading any weights.

A safetensors file is 8 bytes of little-endian header length, a JSON header
(`{tensor name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}`) and the
raw tensor data. Reading the header costs one small read, so parameter counts, dtypes
and tensor names are known in milliseconds whatever the file size. A header that does
not fit the file (a truncated download) is reported as `InvalidArgument` with reason
`CORRUPT_WEIGHTS`, naming the file.
"""

from __future__ import annotations

import json
import math
import stat
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catalog_service.detection.common import display_path, read_json_object
from catalog_service.paths import named_path, not_regular_error, open_regular
from server_kit.errors import InvalidArgument

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The safetensors format's own limit on the JSON header size."""

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
"""Bits per element of each safetensors dtype."""

DTYPE_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "F4": "float4_e2m1fn",
}
"""safetensors dtype -> the torch dtype name used in config.json (`float32`, `bfloat16`, ...)."""

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})


def _corrupt(path: Path, problem: str, base: Path | None) -> InvalidArgument:
    name = display_path(path, base)
    return InvalidArgument(
        f"{name} is not a readable safetensors file: {problem}. "
        "The file is probably truncated or damaged; download or copy it again.",
        reason="CORRUPT_WEIGHTS",
        metadata={"file": name},
    )


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one safetensors file."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    header_bytes: int = 0
    file_size: int = 0

    @property
    def parameter_count(self) -> int:
        """Total number of elements over all tensors."""
        return sum(t.numel for t in self.tensors.values())

    def dtype_counts(self) -> Counter[str]:
        """Elements per safetensors dtype (`{"F32": 123, ...}`)."""
        counts: Counter[str] = Counter()
        for tensor in self.tensors.values():
            counts[tensor.dtype] += tensor.numel
        return counts

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def get(self, name: str) -> TensorInfo | None:
        """The tensor called `name`, or None."""
        return self.tensors.get(name)

    def names(self) -> list[str]:
        """All tensor names, in header order."""
        return list(self.tensors)


def read_header(path: Path, *, base: Path | None = None) -> SafetensorsHeader:
    """Read and check the header of the safetensors file at `path`; no weights are read.

    Args:
        path: the `.safetensors` file.
        base: folder the file belongs to, for messages (`unet/diffusion_pytorch_model.safetensors`).

    Raises:
        InvalidArgument: reason `CORRUPT_WEIGHTS` when the file is shorter than its header
            says, the header is not JSON, an entry is malformed, or tensor data lies
            beyond the end of the file.
    """
    try:
        status = path.stat()
        file_size, mode = status.st_size, status.st_mode
    except FileNotFoundError as exc:
        name = display_path(path, base)
        raise InvalidArgument(
            f"weight file {name} is missing; copy or download it again.",
            reason="MISSING_WEIGHT_FILE",
            metadata={"file": name},
        ) from exc
    except OSError as exc:
        raise _corrupt(path, f"it cannot be read ({exc.strerror or type(exc).__name__})", base) from exc
    if not stat.S_ISREG(mode):
        raise not_regular_error(display_path(path, base))
    # Messages below never quote bytes of the file (its first 8 bytes are not echoed as a
    # "header length"): a file read by mistake must not leak through an error.
    try:
        with open_regular(path, display_path(path, base)) as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(
                    path, f"the file has {file_size} bytes, fewer than the 8-byte header length", base
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise _corrupt(path, "its header length exceeds the format's 100 MiB limit", base)
            if 8 + header_len > file_size:
                raise _corrupt(
                    path, f"its header length runs past the end of the file ({file_size} bytes)", base
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise _corrupt(path, f"it cannot be read ({exc.strerror or type(exc).__name__})", base) from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _corrupt(path, f"the header is not UTF-8 (at byte {exc.start})", base) from exc
    except json.JSONDecodeError as exc:
        raise _corrupt(
            path, f"the header is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})", base
        ) from exc
    except (ValueError, RecursionError) as exc:  # too deep, too many digits
        raise _corrupt(
            path, f"the header is not JSON this catalog can read ({type(exc).__name__})", base
        ) from exc
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object", base)

    data_size = file_size - 8 - header_len
    metadata_raw = header.pop("__metadata__", None) or {}
    metadata = {str(k): str(v) for k, v in metadata_raw.items()} if isinstance(metadata_raw, dict) else {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_size, base)
    return SafetensorsHeader(
        path=path, tensors=tensors, metadata=metadata, header_bytes=header_len, file_size=file_size
    )


def _shown(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tensor_info(path: Path, name: str, entry: Any, data_size: int, base: Path | None) -> TensorInfo:
    shown = _shown(name)
    if not isinstance(entry, dict):
        raise _corrupt(path, f"the entry of tensor {shown} is not an object", base)
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise _corrupt(path, f"tensor {shown} has no dtype", base)
    if dtype not in DTYPE_BITS:
        raise _corrupt(path, f"tensor {shown} has an unknown dtype {_shown(dtype, 24)}", base)
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _corrupt(path, f"tensor {shown} has an invalid shape {_shown(shape)}", base)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _corrupt(path, f"tensor {shown} has invalid data offsets {_shown(offsets)}", base)
    start, end = int(offsets[0]), int(offsets[1])
    if end > data_size:
        raise _corrupt(
            path,
            f"tensor {shown} ends past the end of the data section ({data_size} bytes)",
            base,
        )
    info = TensorInfo(name=name, dtype=dtype, shape=tuple(shape), data_offsets=(start, end))
    bits = DTYPE_BITS[dtype]
    # With a known dtype the shape is tied to bytes present in the file, so element
    # counts stay bounded by the file size (no 2**64-element tensors).
    if (info.numel * bits + 7) // 8 != end - start:
        raise _corrupt(
            path,
            f"tensor {shown} ({dtype}, shape {_shown(list(shape))}) does not fit its data offsets "
            f"(they span {end - start} bytes)",
            base,
        )
    return info


def read_scalar(header: SafetensorsHeader, name: str) -> float | None:
    """The value of a one-element float/int tensor (e.g. a kohya LoRA `.alpha`), read from disk."""
    tensor = header.get(name)
    if tensor is None or tensor.numel != 1:
        return None
    formats = {
        "F32": "<f",
        "F64": "<d",
        "F16": "<e",
        "I64": "<q",
        "I32": "<i",
        "I16": "<h",
        "I8": "<b",
        "U8": "<B",
    }
    start, end = tensor.data_offsets
    offset = 8 + header.header_bytes + start
    with open_regular(header.path) as handle:
        handle.seek(offset)
        raw = handle.read(end - start)
    if tensor.dtype == "BF16" and len(raw) == 2:
        return float(struct.unpack("<f", b"\x00\x00" + raw)[0])
    fmt = formats.get(tensor.dtype)
    if fmt is None or len(raw) != struct.calcsize(fmt):
        return None
    return float(struct.unpack(fmt, raw)[0])


def dominant_dtype(counts: Mapping[str, int]) -> str:
    """The torch dtype name of the float dtype holding most elements (`""` when none).

    Integer tensors (packed quantized weights, position ids) only count when there is no
    float tensor at all.
    """
    floats = {k: v for k, v in counts.items() if k in FLOAT_DTYPES and v > 0}
    pool = floats or {k: v for k, v in counts.items() if v > 0}
    if not pool:
        return ""
    best = max(sorted(pool), key=lambda k: pool[k])
    return DTYPE_NAMES.get(best, best.lower())


@dataclass(frozen=True)
class WeightSet:
    """The safetensors headers of one model's weights (one file or all shards)."""

    headers: tuple[SafetensorsHeader, ...]

    @property
    def parameter_count(self) -> int:
        """Total elements over every shard."""
        return sum(h.parameter_count for h in self.headers)

    def dtype_counts(self) -> Counter[str]:
        """Elements per safetensors dtype over every shard."""
        total: Counter[str] = Counter()
        for header in self.headers:
            total.update(header.dtype_counts())
        return total

    @property
    def dtype(self) -> str:
        """Dominant float dtype, torch naming (`float32`)."""
        return dominant_dtype(self.dtype_counts())

    def tensors(self) -> Iterator[TensorInfo]:
        """Every tensor of every shard."""
        for header in self.headers:
            yield from header.tensors.values()

    def get(self, name: str) -> TensorInfo | None:
        """The tensor called `name` in any shard."""
        for header in self.headers:
            tensor = header.get(name)
            if tensor is not None:
                return tensor
        return None

    def names(self) -> set[str]:
        """All tensor names over every shard."""
        return {name for header in self.headers for name in header.tensors}


def read_headers(paths: Iterable[Path], *, base: Path | None = None) -> WeightSet:
    """Read the headers of several safetensors files (shards of one model)."""
    return WeightSet(tuple(read_header(p, base=base) for p in paths))


def index_shards(index_path: Path, *, base: Path | None = None) -> tuple[list[Path], dict[str, str]]:
    """The shard files named by a `*.safetensors.index.json` and its tensor -> shard map.

    Raises:
        InvalidArgument: `CORRUPT_JSON` when the index is not JSON or has no `weight_map`.
        PermissionDenied: `PATH_OUTSIDE_ALLOWED_ROOTS` for a shard named by an absolute
            path, with `..`, or through a symlink leading out of the model's folder.
    """
    index = read_json_object(index_path, base=base)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        name = display_path(index_path, base)
        raise InvalidArgument(
            f"{name} has no valid `weight_map` object; fix or replace the file.",
            reason="CORRUPT_JSON",
            metadata={"file": name},
        )
    shards = sorted(set(weight_map.values()))
    # Shard names are file contents: confined to the model's folder like a request path.
    files = [named_path(index_path.parent, s, base=base or index_path.parent) for s in shards]
    return files, {str(k): str(v) for k, v in weight_map.items()}


def model_weight_files(folder: Path, stem: str = "model") -> list[Path]:
    """The safetensors files holding one model in `folder`.

    `{stem}.safetensors.index.json` names the shards when present; otherwise
    `{stem}.safetensors` or `{stem}-NNNNN-of-NNNNN.safetensors`; otherwise every top-level
    `.safetensors` file except `consolidated*` (original-format duplicates).
    """
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards, _ = index_shards(index, base=folder)
        return shards
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    sharded = sorted(folder.glob(f"{stem}-*-of-*.safetensors"))
    if sharded:
        return sharded
    return sorted(
        p for p in folder.glob("*.safetensors") if p.is_file() and not p.name.startswith("consolidated")
    )
