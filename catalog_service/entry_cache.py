"""A cache of parsed entries bounded by the bytes it holds, not by a count.

Model entries are stored as serialized protos (`db.ModelRow.entry`): reading one
is a ~1 µs parse, as cheap as a cache hit, so models are not cached. Workers are
stored as JSON (`db.WorkerRow.data`) and re-read on every routing decision, so
their parsed form is cached here, keyed by id and valid while the stored JSON is
unchanged.

Memory: each cached entry costs `entry_bytes()`: the Python size of its key,
its check string and its serialized proto, plus `ENTRY_OVERHEAD` for the
dictionary slot, the ordering link, the tuple and the size (measured with
tracemalloc on CPython 3.11 over 10 000 entries: 162 bytes each; 200 is the bound
used). A worker whose JSON is 1.5 KB and whose serialized proto is 0.8 KB counts
~2.7 KB; the default bound, `DEFAULT_MAX_BYTES` (16 MiB), holds ~6000 such
workers. An entry larger than the whole bound is not cached.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TypeVar

from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

ENTRY_OVERHEAD = 200
"""Bytes one cached entry costs beyond its key, check and serialized message."""
DEFAULT_MAX_BYTES = 16 * 1024 * 1024


def entry_bytes(key: str, check: str, serialized: bytes) -> int:
    """The memory one cached entry is counted as."""
    return sys.getsizeof(key) + sys.getsizeof(check) + sys.getsizeof(serialized) + ENTRY_OVERHEAD


class ParsedCache:
    """Parsed protos per key, valid while their `check` string is unchanged; LRU within
    `max_bytes` (0 disables the cache). Thread-safe. Hits return a fresh copy."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[str, bytes, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes_used(self) -> int:
        """Memory the cached entries are counted as (see `entry_bytes`)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def parse(self, message_type: type[M], key: str, check: str, parse: Callable[[], M]) -> M:
        """The cached message of `key` when it is at `check`, else `parse()` (then cached)."""
        cached = self.get(message_type, key, check)
        if cached is not None:
            return cached
        message = parse()
        self.put(key, check, message)
        return message

    def get(self, message_type: type[M], key: str, check: str) -> M | None:
        """The cached message of `key` when it is at version `check`, else None."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is None or hit[0] != check:
                return None
            self._entries.move_to_end(key)
        return message_type.FromString(hit[1])

    def put(self, key: str, check: str, message: Message) -> None:
        """Remember `message` as the parsed form of `key` at `check`; evicts the least
        recently used entries beyond `max_bytes`."""
        if self.max_bytes <= 0:
            return
        serialized = message.SerializeToString()
        size = entry_bytes(key, check, serialized)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
            if size > self.max_bytes:
                return
            self._entries[key] = (check, serialized, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _key, (_check, _data, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted

    def discard(self, keys: Iterable[str]) -> None:
        """Forget `keys` (deleted rows)."""
        with self._lock:
            for key in keys:
                old = self._entries.pop(key, None)
                if old is not None:
                    self._bytes -= old[2]


__all__ = ["DEFAULT_MAX_BYTES", "ENTRY_OVERHEAD", "ParsedCache", "entry_bytes"]
