"""The whole system as local processes: the broker and every service, as ``corral up`` runs them.

The services are the registry's (``services/registry.py``). Each runs as ``python -m <its
module>`` with ``CORRAL_*`` environment variables: the same command and environment as in
``docker-compose.yml`` (a test keeps the two in step). With the demo, the demo payments API
(``corral/demo/payments.py``) runs too, on a free loopback port, and the services are given its
URL as ``CORRAL_DEMO_PAYMENTS_URL`` (the demo refund tool's URL names that variable).

:class:`System` owns its state directory while it runs (an ``flock`` on ``corral.lock``, which
the kernel releases however the owner ends), first stops what a killed predecessor left running
(``processes.json``), starts the broker and the services, and stops them services first, broker
last. :meth:`System.supervise` restarts children that exit, with backoff, and gives up on one that
keeps crashing. Every child has a session of its own, so a terminal's Ctrl-C reaches only the
owner. The behaviour is described in docs/operations.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.errors import NoRespondersError

from contracts import subjects
from contracts.definitions import Catalog
from corral.demo.payments import URL_VARIABLE as PAYMENTS_URL_VARIABLE
from corral.nats_server import BrokerError, NatsServer, free_port, tail
from corral.processes import (
    BROKER,
    PROCESSES_FILE,
    RUNTIME_FILE,
    CrashHistory,
    RestartPolicy,
    cpu_seconds,
    describe_exit,
    process_identity,
    stop_orphans,
    to_stderr,
    write_json,
)
from corral.state import ADMIN_USER, init_state
from services.registry import BY_NAME, SERVICES
from services.runtime.credentials import Secrets
from services.runtime.service import STOP_MARGIN_S
from services.runtime.settings import Settings

READINESS_TENANT = "corral-readiness"
# Exit statuses of a child killed by a signal only a terminal sends to a whole process group.
TERMINAL_SIGNALS = frozenset({-signal.SIGINT, -signal.SIGHUP, -signal.SIGQUIT})
LOCK_FILE = "corral.lock"  # holds the owner's pid; locked while a system runs from the directory
PAYMENTS = "payments"  # the demo payments API's name among the children
MONITOR = "monitor"  # its replicas get an HTTP port each; the first one's URL goes in corral.json
PAYMENTS_MODULE = "corral.demo.payments"
PAYMENTS_STATE_FILE = "demo-payments.json"  # its refunds, kept across restarts


class StateDirBusy(RuntimeError):
    """Another system runs from this state directory."""


class SupervisionError(RuntimeError):
    """A child keeps crashing: the supervisor gave up."""


class StartInterrupted(RuntimeError):
    """``start(stop=...)`` was asked to stop before the system was ready (it stopped what it started)."""


class DefinitionsInvalid(RuntimeError):
    """The definitions the services would read have problems: nothing was started.

    ``str()`` is every problem, one ``file:line: path.to.key: message`` per line (as ``corral validate``)."""

    def __init__(self, report: str, count: int) -> None:
        super().__init__(report)
        self.count = count


def service_command(name: str, python: str = sys.executable) -> list[str]:
    """The command that runs one replica of a service."""
    return [python, "-m", BY_NAME[name].module]


def service_environment(nats_url: str, state_dir: Path, **extra: str) -> dict[str, str]:
    """The ``CORRAL_*`` variables a service needs (credentials come from the state directory)."""
    return {"CORRAL_NATS_URL": nats_url, "CORRAL_STATE_DIR": str(state_dir), **extra}


def payments_command(port: int, state_file: Path, python: str = sys.executable, host: str = "127.0.0.1") -> list[str]:
    """The command that runs the demo payments API."""
    return [python, "-m", PAYMENTS_MODULE, "--host", host, "--port", str(port), "--state", str(state_file)]


# ---- processes -----------------------------------------------------------------------------


@dataclass
class ServiceProcess:
    name: str
    replica: int
    process: subprocess.Popen
    log_path: Path | None
    started_at: float = field(default_factory=time.monotonic)

    def tail(self, lines: int = 20) -> str:
        return tail(self.log_path, lines)


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
    demo: bool = True  # copy the demo definitions into a state directory that has none; run the payments API
    payments_port: int | None = None  # the demo payments API's (a free one, chosen at start)
    # Each monitor replica's HTTP port on loopback (free ones, chosen at its first start).
    monitor_ports: dict[int, int] = field(default_factory=dict)
    broker: NatsServer | None = None
    processes: list[ServiceProcess] = field(default_factory=list)
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    say: Callable[[str], None] = to_stderr  # supervision notices (one line each)
    _lock_fd: int | None = field(default=None, repr=False)
    _broker_started_at: float = field(default=0.0, repr=False)
    _interrupt: asyncio.Event | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        if self.nats_url:
            return self.nats_url
        assert self.broker is not None
        return self.broker.url

    @property
    def monitor_url(self) -> str | None:
        """The first monitor replica's HTTP base URL (``corral top`` and the page read it)."""
        if MONITOR not in BY_NAME or self.replicas.get(MONITOR, 1) < 1:
            return None
        configured = {**os.environ, **self.env}.get("CORRAL_MONITOR_HTTP")
        if configured:
            return f"http://{configured}"
        port = self.monitor_ports.get(0)
        return f"http://127.0.0.1:{port}" if port else None

    @property
    def payments_url(self) -> str | None:
        """The demo payments API's base URL, when the demo runs."""
        return f"http://127.0.0.1:{self.payments_port}" if self.payments_port else None

    async def start(self, *, timeout: float = 30.0, stop: asyncio.Event | None = None) -> System:
        """Start everything and wait until it is ready. When ``stop`` is set first, stop what was
        started and raise :class:`StartInterrupted` (checked between steps rather than by
        cancelling the task: nats-py's ``close`` swallows a cancellation)."""
        self._interrupt = stop
        self.lock()  # before anything is written: a running system's files are left alone
        try:
            stop_orphans(self.state_dir, self.say)
            self.secrets = init_state(self.state_dir, port=self.port, demo=self.demo)
            catalog = self._check_definitions()  # before any process: one report instead of a crash per service
            if self.nats_url is None:
                log_dir = self.log_dir or self.state_dir
                log_dir.mkdir(parents=True, exist_ok=True)
                log = log_dir / "nats.log"
                self.broker = NatsServer(config=self.state_dir / "nats.conf", port=self.port, log_file=log)
                self._start_broker()
            await self._seed_registry(catalog, timeout)
            if self.demo:  # before the services, which are given its URL
                self.payments_port = self.payments_port or free_port()
                self.processes.append(self._spawn(PAYMENTS, 0))
                self._record()
            for manifest in SERVICES:
                for replica in range(self.replicas.get(manifest.name, 1)):
                    self.processes.append(self._spawn(manifest.name, replica))
                    self._record()
            await self.wait_ready(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        finally:
            self._interrupt = None
        self._write_runtime_info()
        return self

    # ---- the state directory ---------------------------------------------------------

    def lock(self) -> None:
        """Take the state directory, or raise :class:`StateDirBusy` naming the pid that holds it.

        An ``flock``: the kernel drops it when the owner exits, even by SIGKILL. The descriptor is
        not inherited, so a child left running does not keep the directory locked."""
        if self._lock_fd is not None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateDirBusy(
                f"another corral up (pid {holder}) is running from {self.state_dir}; "
                "stop it first, or use another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the only descriptor releases the lock
            self._lock_fd = None

    def children(self) -> list[dict[str, Any]]:
        """Every child (one awaiting its restart too): name, replica, pid and identity (see
        :func:`process_identity`, None once it has exited)."""
        found = []
        if self.broker is not None and self.broker.process is not None:
            found.append((BROKER, 0, self.broker.process.pid))
        found += [(p.name, p.replica, p.process.pid) for p in self.processes]
        return [
            {"name": name, "replica": replica, "pid": pid, "identity": process_identity(pid)}
            for name, replica, pid in found
        ]

    def _record(self) -> None:
        """Write the children down, so the next owner can stop them if this one is killed."""
        write_json(
            self.state_dir / PROCESSES_FILE,
            {"pid": os.getpid(), "identity": process_identity(os.getpid()), "processes": self.children()},
        )

    def _write_runtime_info(self) -> None:
        info: dict[str, Any] = {
            "nats_url": self.url,
            "pid": os.getpid(),
            "processes": [{k: c[k] for k in ("name", "replica", "pid")} for c in self.children()],
        }
        if self.payments_url:
            info["payments_url"] = self.payments_url
        if self.monitor_url:
            info["monitor_url"] = self.monitor_url
        write_json(self.state_dir / RUNTIME_FILE, info)

    def _check_definitions(self) -> Catalog:
        """Check the definitions the services will read, as ``corral validate`` does (Python
        callables imported too); raise :class:`DefinitionsInvalid` listing every problem."""
        from services.runtime.catalog import check_definitions, configured_paths

        setting = {**os.environ, **self.env}.get("CORRAL_DEFINITIONS")
        checked = check_definitions(configured_paths(setting, self.state_dir), imports=True)
        if checked.problems or checked.catalog is None:
            raise DefinitionsInvalid(checked.report(), len(checked.problems))
        return checked.catalog

    async def _seed_registry(self, catalog: Catalog, timeout: float) -> None:
        """Write the definitions' tenants the tenant registry lacks (or took from an older version
        of the files) before any service reads it; say what changed."""
        from corral.tenant_admin import Registry
        from services.runtime.loop import collector_paused

        deadline = time.monotonic() + timeout
        admin = await self._connect_admin(deadline, timeout)
        try:
            while True:
                try:
                    # (reading 10,000 tenants' entries back builds as many policies: no collections meanwhile)
                    with collector_paused():
                        report = await (await Registry(admin, operator="corral-up").open()).seed(catalog)
                    break
                except NoRespondersError:  # JetStream is still starting up in a fresh broker
                    self._check_alive()
                    if time.monotonic() > deadline:
                        raise BrokerError(f"JetStream did not answer within {timeout}s") from None
                    await asyncio.sleep(0.1)  # retrying with a deadline
        finally:
            await admin.close()
        if report.created or report.updated:
            self.say(
                f"corral: the tenant registry took {len(report.created)} new and {len(report.updated)} changed "
                "tenants from the definitions"
            )
        if report.kept:
            shown = ", ".join(report.kept[:5]) + (" ..." if len(report.kept) > 5 else "")
            self.say(f"corral: kept the registry's own version of {len(report.kept)} tenants changed there ({shown})")

    # ---- children ------------------------------------------------------------------------

    def _start_broker(self) -> None:
        assert self.broker is not None
        self._broker_started_at = time.monotonic()
        try:
            self.broker.start()
        finally:
            self._record()

    def _spawn(self, name: str, replica: int) -> ServiceProcess:
        if name == PAYMENTS:
            assert self.payments_port is not None
            command = payments_command(self.payments_port, self.state_dir / PAYMENTS_STATE_FILE)
            env = {**os.environ, **self.env}
        else:
            demo = {PAYMENTS_URL_VARIABLE: self.payments_url} if self.payments_url else {}
            command = service_command(name)
            env = {**os.environ, **service_environment(self.url, self.state_dir, **demo), **self.env}
        env["CORRAL_REPLICA"] = str(replica)  # its name in logs: graph-2
        if name == MONITOR and "CORRAL_MONITOR_HTTP" not in env:
            env["CORRAL_MONITOR_HTTP"] = f"127.0.0.1:{self.monitor_ports.setdefault(replica, free_port())}"
        log_path = None
        output = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{name}-{replica}.log"
            output = open(log_path, "ab")  # noqa: SIM115 - closed below; the child has its own copy
        try:
            # A session of its own: Ctrl-C reaches only `corral up`, which stops services before the broker.
            process = subprocess.Popen(command, env=env, stdout=output, stderr=output, start_new_session=True)
        finally:
            if output is not None:
                output.close()
        return ServiceProcess(name, replica, process, log_path)

    async def wait_ready(self, *, timeout: float) -> None:
        """Wait until every replica answers its ping and the auth callout admits a tenant (the
        callout responder lives outside the tenants' account, where no ping reaches it)."""
        from services.auth.tokens import mint_dev_token

        assert self.secrets is not None
        deadline = time.monotonic() + timeout
        if self.payments_port is not None:
            await self._wait_listening(self.payments_port, PAYMENTS, deadline, timeout)
        admin = await self._connect_admin(deadline, timeout)
        try:
            for manifest in SERVICES:
                expected = self.replicas.get(manifest.name, 1)
                if not manifest.in_app or expected == 0:
                    continue
                # The progress of this service's own processes: another's background work (the
                # monitor's polls) must not keep a stuck one waited for.
                patience = Patience(timeout, lambda name=manifest.name: cpu_seconds(self._pids(name)))
                while await self._count_pings(admin, manifest.name) < expected:
                    self._check_alive()
                    if patience.exhausted():
                        raise BrokerError(f"service {manifest.name} did not become ready: {patience.why()}")
        except Exception:
            self._check_alive()  # a child that died explains a failure better than its symptom
            raise
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

    def _pids(self, name: str) -> list[int]:
        return [p.process.pid for p in self.processes if p.name == name]

    async def _connect_admin(self, deadline: float, timeout: float) -> nats.NATS:
        assert self.secrets is not None
        while True:
            self._check_alive()
            try:
                return await nats.connect(
                    self.url,
                    user=ADMIN_USER,
                    password=self.secrets.passwords[ADMIN_USER],
                    inbox_prefix=b"_INBOX._admin",
                    connect_timeout=2,
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                )
            except Exception as error:
                if time.monotonic() > deadline:
                    raise BrokerError(f"could not connect to NATS at {self.url} within {timeout}s: {error}") from None
                await asyncio.sleep(0.1)  # retrying a connection with a deadline

    async def _wait_listening(self, port: int, name: str, deadline: float, timeout: float) -> None:
        """Until something accepts connections on the loopback ``port`` (a child that is not a service)."""
        while True:
            self._check_alive()
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if time.monotonic() > deadline:
                    raise BrokerError(f"{name} did not listen on 127.0.0.1:{port} within {timeout}s") from None
                await asyncio.sleep(0.05)  # polling for the listener with a deadline
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

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
        if self._interrupt is not None and self._interrupt.is_set():
            raise StartInterrupted("stopped before the system was ready")
        children = [proc.process for proc in self.processes]
        if self.broker is not None and self.broker.process is not None:
            children.append(self.broker.process)
        if any(child.poll() in TERMINAL_SIGNALS for child in children):
            # A terminal's Ctrl-C or hangup reached a child in the moment between its start and
            # its own session: the same signal is on its way to this process, which stops.
            raise StartInterrupted("stopped before the system was ready")
        if self.broker is not None and self.broker.process is not None and self.broker.process.poll() is not None:
            raise BrokerError(
                f"nats-server {describe_exit(self.broker.process.returncode)}; "
                f"the end of its log:\n{self.broker.tail()}"
            )
        for proc in self.processes:
            if proc.process.poll() is not None:
                raise BrokerError(f"service {proc.name} exited with code {proc.process.returncode}\n{proc.tail()}")

    # ---- supervision ---------------------------------------------------------------------

    async def supervise(self, stop: asyncio.Event, *, poll_s: float = 0.2) -> None:
        """Until ``stop`` is set, start again every child that exits, after the policy's delay,
        and say so in one line. Raises :class:`SupervisionError` when a child exits
        ``max_crashes`` times within ``window_s`` (the caller then stops the system)."""
        histories: dict[tuple[str, int], CrashHistory] = {}
        due: dict[tuple[str, int], tuple[float, str]] = {}  # child -> (when to restart, what happened)
        while not stop.is_set():
            now = time.monotonic()
            for key, pid, returncode, started_at, log in self._exited():
                if key in due:
                    continue
                who = key[0] if key[0] == BROKER else f"{key[0]} replica {key[1]}"
                what = f"{who} (pid {pid}) {describe_exit(returncode)}"
                history = histories.setdefault(key, CrashHistory(self.policy))
                delay = history.crashed(now, now - started_at)
                if delay is None:
                    raise SupervisionError(
                        f"{key[0]} keeps crashing ({len(history.exits)} exits within "
                        f"{self.policy.window_s:g} s, the last: {what}); giving up.\n"
                        + (f"The end of its log ({log}):\n{tail(log)}" if log else "Its output is above.")
                    )
                due[key] = (now + delay, f"{what}; restarted after {delay:g} s")
            for key, (when, what) in list(due.items()):
                if when <= now and not stop.is_set():
                    del due[key]
                    new_pid = await self._restart(key)
                    if new_pid is not None:
                        self.say(f"corral: {what} as pid {new_pid}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=poll_s)

    def _exited(self) -> list[tuple[tuple[str, int], int, int, float, Path | None]]:
        """Children that are not running: (name, replica), pid, exit code, start time, log."""
        found = []
        broker = self.broker
        if broker is not None and broker.process is not None and broker.process.poll() is not None:
            found.append(
                ((BROKER, 0), broker.process.pid, broker.process.returncode, self._broker_started_at, broker.log_path)
            )
        for proc in self.processes:
            if proc.process.poll() is not None:
                key = (proc.name, proc.replica)
                found.append((key, proc.process.pid, proc.process.returncode, proc.started_at, proc.log_path))
        return found

    async def restart(self, process: ServiceProcess, *, timeout: float = 30.0) -> None:
        """Start a service's replica again (one that was killed) and wait until it is ready."""
        if await self._restart((process.name, process.replica)) is None:
            raise BrokerError(f"{process.name} replica {process.replica} did not start again")
        await self.wait_ready(timeout=timeout)

    async def add_replica(self, name: str, *, timeout: float = 30.0) -> ServiceProcess:
        """Start one more replica of service ``name`` and wait until it is ready (scaling out
        a running system; the supervisor restarts it like the others)."""
        if name not in BY_NAME or name == PAYMENTS:
            raise ValueError(f"no service {name!r} to scale")
        replica = max((p.replica for p in self.processes if p.name == name), default=-1) + 1
        process = self._spawn(name, replica)
        self.processes.append(process)
        self.replicas[name] = sum(p.name == name for p in self.processes)
        self._record()
        self._write_runtime_info()
        await self.wait_ready(timeout=timeout)
        return process

    async def _restart(self, key: tuple[str, int]) -> int | None:
        """Start one child again; its new pid, or None if it failed at once (counted as a crash)."""
        name, replica = key
        if name == BROKER:
            assert self.broker is not None
            try:
                # In a thread: the loop keeps answering signals while the broker comes up.
                await asyncio.to_thread(self._start_broker)
            except BrokerError as error:
                self.say(f"corral: {error}")
                return None
            pid = self.broker.process.pid if self.broker.process else None
        else:
            index = next(i for i, p in enumerate(self.processes) if (p.name, p.replica) == key)
            self.processes[index] = self._spawn(name, replica)
            pid = self.processes[index].process.pid
        self._record()
        self._write_runtime_info()
        return pid

    # ---- stopping ------------------------------------------------------------------------

    def stop(self, *, timeout: float | None = None) -> None:
        """Stop services first (they finish in-flight messages and the tool calls they make), then
        the demo payments API, then the broker. A service is given its drain timeout, the margin
        it may take beyond it (Service.stop) and two seconds to exit, then killed."""
        if timeout is None:
            drain = {**os.environ, **self.env}.get("CORRAL_DRAIN_TIMEOUT_S")
            drain_s = Settings(**({"drain_timeout_s": drain} if drain else {})).drain_timeout_s
            timeout = drain_s + STOP_MARGIN_S + 2.0
        services = [proc for proc in self.processes if proc.name != PAYMENTS]
        for group in (services, [proc for proc in self.processes if proc.name == PAYMENTS]):
            for proc in group:
                if proc.process.poll() is None:
                    proc.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for proc in group:
                try:
                    proc.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.process.kill()
                    proc.process.wait()
        self.processes.clear()
        if self.broker is not None:
            self.broker.close()
            self.broker = None
        if self._lock_fd is not None:  # only the owner removes the directory's runtime files
            for name in (RUNTIME_FILE, PROCESSES_FILE):
                with contextlib.suppress(FileNotFoundError):
                    (self.state_dir / name).unlink()
            self._unlock()

    async def __aenter__(self) -> System:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.stop()


class Patience:
    """How long ``corral up`` waits for its services: as long as they make progress (use CPU:
    loading ten thousand tenants takes longer than three), until ``timeout`` seconds pass with
    none. Where CPU time cannot be read, ``timeout`` seconds in all."""

    def __init__(
        self, timeout: float, progress: Callable[[], float | None], clock: Callable[[], float] = time.monotonic
    ):
        self.timeout = timeout
        self.progress = progress
        self.clock = clock
        self.started = self.last_moved = clock()
        self.seen = progress()

    def exhausted(self) -> bool:
        now = self.clock()
        current = self.progress()
        if current is None or self.seen is None:
            return now - self.started > self.timeout
        if current > self.seen + 0.01:  # at least 10 ms of CPU since the last look: still working
            self.seen, self.last_moved = current, now
        return now - self.last_moved > self.timeout

    def why(self) -> str:
        if self.seen is None:
            return f"not within {self.timeout:g}s"
        return f"no progress for {self.timeout:g}s (after {self.clock() - self.started:.0f}s in all)"
