"""What the CLI prints: proto JSON for scripts, tables and key/value blocks for people.

`--json` prints the proto JSON of the RPC's answer exactly as grpcurl does
(`MessageToJson`, camelCase field names, enums by name). A command that
answers with one message prints it indented; a command that prints several
messages (a watched job, a stream, a chat) prints one compact JSON object per
line (JSON Lines).
"""

from __future__ import annotations

import datetime as dt
import itertools
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import IO, Any

from google.protobuf import json_format
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

LONG_TEXT = 80

_BIDI_CONTROLS = frozenset(range(0x202A, 0x202F)) | frozenset(range(0x2066, 0x206A))
_CONTROL_ESCAPES = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in (*range(0x00, 0x20), *range(0x7F, 0xA0), *_BIDI_CONTROLS)
}
"""Control characters (C0, DEL, C1, bidi overrides) -> their escaped form (`\\x1b`)."""


def printable(text: object, *, keep_newlines: bool = False) -> str:
    """`text` with every control character escaped (`ESC` -> `\\x1b`), safe to print to a terminal.

    Stored strings (display names, descriptions, messages) can hold ANSI escapes or
    carriage returns that would redraw the screen or forge output; the CLI prints them
    as visible escapes. With `keep_newlines`, `\\n` stays (layout of multi-line text).
    """
    value = str(text)
    if keep_newlines:
        return "\n".join(line.translate(_CONTROL_ESCAPES) for line in value.split("\n"))
    return value.translate(_CONTROL_ESCAPES)


def to_json(message: Message, *, indent: int | None = 2) -> str:
    """Proto JSON of `message` (camelCase names, like grpcurl); one line when `indent` is None."""
    return json_format.MessageToJson(message, indent=indent)


def print_json(message: Message, *, file: IO[str] | None = None) -> None:
    """Print one answer as indented proto JSON."""
    print(to_json(message), file=file or sys.stdout)


def print_json_line(message: Message, *, file: IO[str] | None = None) -> None:
    """Print one message of a sequence as compact proto JSON on one line, and flush."""
    out = file or sys.stdout
    print(to_json(message, indent=None).replace("\n", " "), file=out, flush=True)


def enum_label(descriptor: EnumDescriptor, value: int) -> str:
    """An enum value's name without the enum's prefix: MODEL_STATE_READY -> READY; `-` for 0."""
    if value == 0:
        return "-"
    number = descriptor.values_by_number.get(value)
    if number is None:
        return str(value)
    names = [v.name for v in descriptor.values]
    prefix = _common_prefix(names)
    return number.name[len(prefix) :] or number.name


def _common_prefix(names: Sequence[str]) -> str:
    if len(names) < 2:
        return ""
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    return prefix[: prefix.rfind("_") + 1] if "_" in prefix else ""


def human_bytes(value: int | float | None) -> str:
    """1536 -> `1.5 KiB`; `-` for None or 0."""
    if not value:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def human_count(value: int | None) -> str:
    """3_100_000 -> `3.1M`; `-` for None."""
    if value is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return str(value)


def timestamp_text(stamp: Timestamp) -> str:
    """A timestamp as `2025-01-31 12:00:00` UTC; `-` when unset."""
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return stamp.ToDatetime(tzinfo=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def duration_text(seconds: float | None) -> str:
    """75.2 -> `1m15s`; 3.25 -> `3.2s`; `3h02m`; `-` for None or negative."""
    if seconds is None or seconds < 0:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def number_text(value: float | None, digits: int = 4) -> str:
    """A float with `digits` significant digits; `-` for None."""
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain-text table: headers, then rows, columns padded to fit (no trailing spaces)."""
    text_rows = [[_cell(cell) for cell in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in text_rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = []
    for row in [list(headers), *text_rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    return printable(str(value).replace("\n", " "))


def key_values(pairs: Iterable[tuple[str, object]], *, indent: int = 0) -> str:
    """`key:  value` lines with aligned values; empty values are left out."""
    kept = [(key, _cell(value)) for key, value in pairs if value not in (None, "", [], ())]
    if not kept:
        return ""
    width = max(len(key) for key, _ in kept)
    pad = " " * indent
    return "\n".join(f"{pad}{key + ':':<{width + 1}}  {value}" for key, value in kept)


def message_fields(message: Message) -> list[tuple[str, object]]:
    """The set fields of `message`, flattened to (`dotted.name`, text) pairs for a person.

    Enums by their short name, repeated fields comma-joined, long texts
    (chat templates) shortened with their length, timestamps and durations
    readable, sub-messages flattened with dotted names.
    """
    pairs: list[tuple[str, object]] = []
    for field, value in message.ListFields():
        name = field.name
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if _is_map(field):
                pairs.append((name, ", ".join(f"{k}={v}" for k, v in sorted(value.items()))))
            elif field.is_repeated:
                pairs.append((name, f"{len(value)} item(s)"))
            elif isinstance(value, Timestamp):
                pairs.append((name, timestamp_text(value)))
            elif isinstance(value, Duration):
                pairs.append((name, duration_text(value.ToTimedelta().total_seconds())))
            else:
                pairs.extend((f"{name}.{sub}", text) for sub, text in message_fields(value))
        elif field.is_repeated:
            pairs.append((name, ", ".join(_scalar(field, item) for item in value)))
        else:
            pairs.append((name, _scalar(field, value)))
    return pairs


def _is_map(field: FieldDescriptor) -> bool:
    message_type = field.message_type
    return message_type is not None and message_type.GetOptions().map_entry


def _scalar(field: FieldDescriptor, value: Any) -> str:
    if field.type == FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
        return enum_label(field.enum_type, value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return number_text(value, 6)
    text = str(value)
    if len(text) > LONG_TEXT:
        return f"{printable(text[: LONG_TEXT - 20].replace(chr(10), ' '))}… ({len(text)} chars)"
    return printable(text)


def progress_bar(done: int, total: int, width: int = 24) -> str:
    """`[#########---------------]` for `done` of `total`; empty brackets when total is unknown."""
    if total <= 0:
        return "[" + " " * width + "]"
    filled = min(width, max(0, round(width * done / total)))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class StatusLine:
    """One status line on stderr: redrawn in place on a terminal, one line per change otherwise.

    `update(text)` shows the current status (with a spinner on a terminal);
    `note(text)` prints a line that stays; `close()` clears the status line.
    Off a terminal, `update` prints only texts that differ from the last one
    when `log_updates` is true, and nothing otherwise.
    """

    SPINNER = "|/-\\"

    def __init__(self, file: IO[str] | None = None, *, log_updates: bool = True) -> None:
        self.file = file or sys.stderr
        self.tty = bool(getattr(self.file, "isatty", lambda: False)())
        self.log_updates = log_updates
        self._spin = itertools.cycle(self.SPINNER)
        self._width = 0
        self._last = ""
        self._last_spin = False
        self._lock = threading.RLock()

    def update(self, text: str, *, spin: bool = True) -> None:
        """Show `text` as the current status."""
        with self._lock:
            self._update(text, spin)

    def _update(self, text: str, spin: bool) -> None:
        if self.tty:
            line = f"{next(self._spin)} {text}" if spin else text
            self.file.write("\r" + line.ljust(self._width))
            self._width = len(line)
            self.file.flush()
        elif self.log_updates and text != self._last:
            print(text, file=self.file, flush=True)
        self._last = text
        self._last_spin = spin

    def note(self, text: str) -> None:
        """Print a line that stays (above the status line on a terminal)."""
        with self._lock:
            self.clear()
            print(text, file=self.file, flush=True)
            if self.tty and self._last:
                self._update(self._last, self._last_spin)

    def clear(self) -> None:
        """Remove the status line from a terminal."""
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        if self.tty and self._width:
            self.file.write("\r" + " " * self._width + "\r")
            self.file.flush()
            self._width = 0

    def close(self) -> None:
        """Clear the status line; call when done."""
        self.clear()
