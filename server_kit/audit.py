"""The audit log: one JSON line per mutating call (who, what, when, result).

`server_kit.security.SecurityInterceptor` writes an `AuditEntry` for every call
of an RPC that needs the `worker` or `admin` role (import, create, update and
delete a model, register and deregister a worker, report an engine outcome,
create and cancel a training job, load and unload a model), including calls
refused for missing or insufficient credentials. A successful `Heartbeat` is
not written: workers send one every few seconds, and registration and
deregistration already say when a worker came and went; a refused or failed
heartbeat is written.

A line holds the time (UTC), the RPC, the resource it named, the caller (token
name and role, client-certificate subject, peer address), the request id and
the result code with its reason. It never holds a token or a request body.

Each line is written with one `write()` on a file opened with `O_APPEND`, so
several servers in one process (`modelyard serve all`) or several processes can
share one file without interleaving lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

log = logging.getLogger("modelyard.audit")

AUDIT_OFF = "off"
"""The `MODELYARD_AUDIT_LOG` value that turns the audit log off."""

AUDIT_STDOUT = "-"
"""The `MODELYARD_AUDIT_LOG` value that writes the audit lines to standard output."""


@dataclass
class AuditEntry:
    """One audited call."""

    service: str
    method: str
    resource: str
    code: str
    reason: str = ""
    principal: str = ""
    role: str = ""
    cert_subject: str = ""
    peer: str = ""
    request_id: str = ""
    duration_ms: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)
    time: str = field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )

    def to_json(self) -> str:
        """The entry as one JSON object (empty fields left out)."""
        data = {key: value for key, value in asdict(self).items() if value not in ("", {}, None)}
        extra = data.pop("extra", {})
        data.update(extra)
        ordered = {"time": data.pop("time"), **data}
        return json.dumps(ordered, separators=(",", ":"), sort_keys=False)


class AuditLog:
    """Appends `AuditEntry` lines to a file (or to standard output)."""

    def __init__(self, target: Path | TextIO) -> None:
        self._fd: int | None = None
        self._stream: TextIO | None = None
        if isinstance(target, Path):
            target.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self.where = str(target)
        else:
            self._stream = target
            self.where = getattr(target, "name", "stream")

    @classmethod
    def from_setting(cls, value: str, data_dir: Path) -> AuditLog | None:
        """The audit log `MODELYARD_AUDIT_LOG` asks for: a path ('' = DATA_DIR/audit.log), '-', or 'off'.

        Servers of one process that name the same file share one `AuditLog`.

        Raises:
            ValueError: naming `MODELYARD_AUDIT_LOG` when the file cannot be opened.
        """
        value = value.strip()
        if value.lower() == AUDIT_OFF:
            return None
        if value == AUDIT_STDOUT:
            return cls(sys.stdout)
        path = (Path(value).expanduser() if value else data_dir / "audit.log").resolve()
        with _open_lock:
            if path not in _open_logs:
                try:
                    _open_logs[path] = cls(path)
                except OSError as exc:  # a read-only data dir, a file where a folder should be
                    raise ValueError(
                        f"MODELYARD_AUDIT_LOG: cannot open the audit log {path}: "
                        f"{exc.strerror or type(exc).__name__}; make its folder writable, point "
                        "MODELYARD_AUDIT_LOG elsewhere ('-' for standard output) or set it to 'off'"
                    ) from None
            return _open_logs[path]

    def write(self, entry: AuditEntry) -> None:
        """Append one line; a failure to write is logged, never raised into the RPC."""
        line = entry.to_json() + "\n"
        try:
            if self._fd is not None:
                os.write(self._fd, line.encode())
            elif self._stream is not None:
                self._stream.write(line)
                self._stream.flush()
        except OSError as exc:
            log.error("could not write the audit log %s: %s", self.where, exc)

    def close(self) -> None:
        """Close the file (standard output stays open)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_open_lock = threading.Lock()
_open_logs: dict[Path, AuditLog] = {}
