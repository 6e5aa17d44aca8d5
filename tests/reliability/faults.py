"""Tools of the fault tests: real service processes, SIGKILL, a private PostgreSQL, bounded waits.

Every wait here has a deadline and fails with what it was waiting for, so a fault test
that goes wrong fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from tests.helpers import ServerProcess, free_port

T = TypeVar("T")

QUICK_SHUTDOWN = {"MODELYARD_DRAIN_SECONDS": "0", "MODELYARD_GRACE_SECONDS": "2"}
"""Environment of test servers: no drain period, short grace (tests stop them often)."""


def wait_until(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call `check` until it returns something truthy (returned); TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
        except Exception as error:  # the condition is not met yet (e.g. the server is down)
            last_error = error
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"; last error: {last_error}" if last_error else ""
            raise TimeoutError(f"{what}: not within {timeout} s{detail}")
        time.sleep(interval)


def serve(
    module: str,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    log_path: Path,
    port: int | None = None,
) -> ServerProcess:
    """`python -m module` as a real process on `port` (a free one by default)."""
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    # The last --listen wins: restarts come back on the address their clients dial.
    process = ServerProcess(module, [*args, "--listen", address], {**QUICK_SHUTDOWN, **(env or {})}, log_path)
    process.port, process.address = port, address
    return process


def sigkill(process: ServerProcess, timeout: float = 10.0) -> None:
    """SIGKILL the process (no cleanup runs) and wait until it is gone."""
    process.terminate(signal.SIGKILL)
    process.proc.wait(timeout)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


# --------------------------------------------------------------------------- a private PostgreSQL


def _postgres_bin_dir() -> Path | None:
    """The newest `/usr/lib/postgresql/*/bin` with initdb and pg_ctl, or the one on PATH."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


def require_postgres_binaries() -> Path:
    """The folder of initdb/pg_ctl; skips the test without them (fails it when CI=true)."""
    folder = _postgres_bin_dir()
    problem = "" if folder else "initdb/pg_ctl not found in /usr/lib/postgresql/*/bin or on PATH"
    if folder and os.geteuid() == 0 and not _user_exists("postgres"):
        problem = "running as root and there is no `postgres` user to run initdb as"
    if problem:
        message = f"a private PostgreSQL cannot be started: {problem} (apt-get install postgresql)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true requires the PostgreSQL outage test to run: {message}")
        pytest.skip(message)
    assert folder is not None
    return folder


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class PrivatePostgres:
    """A throw-away PostgreSQL cluster of the test's own (never the machine's shared server).

    It lives in a fresh folder under the system temp dir, listens on 127.0.0.1 on a free
    port with its unix socket in that folder, trusts local connections, and is run as the
    `postgres` user when the tests run as root (PostgreSQL refuses to run as root).
    """

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        # Not under pytest's tmp_path: that is private to root, and the server may run as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="modelyard-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the cluster's `postgres` database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        command = [str(self.bin_dir / tool), *args]
        if self._as_postgres and getpass.getuser() != "postgres":
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()[-2000:]}\n{log}")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start"
        )

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server; `immediate` is a crash: connections drop, no checkpoint."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def close(self) -> None:
        """Stop the server if it runs and delete its folder."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            if (self.data / "postmaster.pid").exists():
                self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A running private PostgreSQL (see `PrivatePostgres`), removed afterwards."""
    cluster = PrivatePostgres(require_postgres_binaries())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
