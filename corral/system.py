"""The whole system as local processes: the broker and every service, as ``corral up`` runs them.

The services are the registry's (``services/registry.py``). Each runs as ``python -m <its
module>`` with ``CORRAL_*`` environment variables: the same command and environment as in
``docker-compose.yml`` (a test keeps the two in step).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats

from contracts import subjects
from corral.nats_server import BrokerError, NatsServer
from corral.state import ADMIN_USER, init_state, write_runtime_info
from services.registry import BY_NAME, SERVICES
from services.runtime.credentials import Secrets

READINESS_TENANT = "corral-readiness"


def service_command(name: str, python: str = sys.executable) -> list[str]:
    """The command that runs one replica of a service."""
    return [python, "-m", BY_NAME[name].module]


def service_environment(nats_url: str, state_dir: Path, **extra: str) -> dict[str, str]:
    """The ``CORRAL_*`` variables a service needs (credentials come from the state directory)."""
    return {"CORRAL_NATS_URL": nats_url, "CORRAL_STATE_DIR": str(state_dir), **extra}


@dataclass
class ServiceProcess:
    name: str
    replica: int
    process: subprocess.Popen
    log_path: Path | None

    def tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class System:
    """A broker (unless ``nats_url`` names an existing one) plus the services' processes."""

    state_dir: Path
    port: int = 4222
    nats_url: str | None = None
    replicas: dict[str, int] = field(default_factory=dict)
    log_dir: Path | None = None  # None: services log to this process's terminal
    env: dict[str, str] = field(default_factory=dict)
    secrets: Secrets | None = None
    demo: bool = True  # copy the demo definitions into a state directory that has none
    broker: NatsServer | None = None
    processes: list[ServiceProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        if self.nats_url:
            return self.nats_url
        assert self.broker is not None
        return self.broker.url

    async def start(self, *, timeout: float = 30.0) -> System:
        self.secrets = init_state(self.state_dir, port=self.port, demo=self.demo)
        try:
            if self.nats_url is None:
                log_dir = self.log_dir or self.state_dir
                log_dir.mkdir(parents=True, exist_ok=True)
                log = log_dir / "nats.log"
                self.broker = NatsServer(config=self.state_dir / "nats.conf", port=self.port, log_file=log).start()
            for manifest in SERVICES:
                for replica in range(self.replicas.get(manifest.name, 1)):
                    self.processes.append(self._spawn(manifest.name, replica))
            await self.wait_ready(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        write_runtime_info(self.state_dir, {"nats_url": self.url, "pid": os.getpid()})
        return self

    def _spawn(self, name: str, replica: int) -> ServiceProcess:
        env = {**os.environ, **service_environment(self.url, self.state_dir), **self.env}
        log_path = None
        output = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{name}-{replica}.log"
            output = open(log_path, "ab")  # noqa: SIM115 - the child keeps it
        # A session of its own: Ctrl-C reaches only `corral up`, which stops services before the broker.
        process = subprocess.Popen(service_command(name), env=env, stdout=output, stderr=output, start_new_session=True)
        return ServiceProcess(name, replica, process, log_path)

    async def wait_ready(self, *, timeout: float) -> None:
        """Wait until every replica answers its ping and the auth callout admits a tenant (the
        callout responder lives outside the tenants' account, where no ping reaches it)."""
        from services.auth.tokens import mint_dev_token

        assert self.secrets is not None
        deadline = time.monotonic() + timeout
        admin = await nats.connect(
            self.url,
            user=ADMIN_USER,
            password=self.secrets.passwords[ADMIN_USER],
            inbox_prefix=b"_INBOX._admin",
            connect_timeout=5,
        )
        try:
            for manifest in SERVICES:
                expected = self.replicas.get(manifest.name, 1)
                if not manifest.in_app or expected == 0:
                    continue
                while await self._count_pings(admin, manifest.name) < expected:
                    self._check_alive()
                    if time.monotonic() > deadline:
                        raise BrokerError(f"service {manifest.name} did not become ready within {timeout}s")
        finally:
            await admin.close()
        token = mint_dev_token(READINESS_TENANT, key=self.secrets.dev_key, ttl_s=60)
        while True:
            self._check_alive()
            try:
                probe = await nats.connect(
                    self.url,
                    token=token,
                    connect_timeout=2,
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                    inbox_prefix=subjects.inbox_prefix(READINESS_TENANT).encode(),
                )
                await probe.close()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise BrokerError(f"the auth service did not admit a tenant within {timeout}s") from None

    @staticmethod
    async def _count_pings(admin: nats.NATS, name: str) -> int:
        inbox = admin.new_inbox()
        sub = await admin.subscribe(inbox)
        pids: set[int] = set()
        try:
            await admin.publish(subjects.ping(name), b"", reply=inbox)
            with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                while True:
                    msg = await sub.next_msg(timeout=0.25)
                    if msg.data:  # an empty message is the server's "no responders" status
                        pids.add(int(json.loads(msg.data)["pid"]))
        finally:
            await sub.unsubscribe()
        return len(pids)

    def _check_alive(self) -> None:
        for proc in self.processes:
            if proc.process.poll() is not None:
                raise BrokerError(f"service {proc.name} exited with code {proc.process.returncode}\n{proc.tail()}")

    def stop(self, *, timeout: float = 15.0) -> None:
        """Stop services first (they finish in-flight messages), then the broker."""
        for proc in self.processes:
            if proc.process.poll() is None:
                proc.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            try:
                proc.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait()
        self.processes.clear()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "corral.json").unlink()

    async def __aenter__(self) -> System:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
