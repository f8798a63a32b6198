"""`corral up` as a supervisor: processes are killed and restarted for real.

Every `corral up` here runs in a session of its own (as a terminal's foreground job would be
signalled with ``os.killpg``), on free loopback ports, with its output in a file. Whatever
happens, each test ends by killing every process that still carries its state directory in its
command line or environment, so no process outlives a test even when the code under test leaks one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.nats_server import free_port
from tests.e2e.test_corral_up import CORRAL, corral

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to find processes")

READY_S = 90  # generous: a busy 2-core machine
SERVICES = ("auth", "router", "graph", "tools")


# ---- helpers -------------------------------------------------------------------------------


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (None: gone, or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def processes_of(state_dir: Path) -> list[int]:
    """Live processes whose command line or environment names ``state_dir``."""
    needle = str(state_dir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in text and start_time(int(entry.name)) is not None:
            found.append(int(entry.name))
    return found


def poll(check: Callable[[], object], what: str, timeout: float = READY_S) -> object:
    """``check()``'s first truthy result, polled with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling with a deadline


class Up:
    """One `corral up` in its own session; its stdout and stderr go to a file."""

    def __init__(self, state_dir: Path, *extra: str, port: int | None = None, env: dict[str, str] | None = None):
        self.state_dir = state_dir
        self.env = {**os.environ, "CORRAL_STATE_DIR": str(state_dir), **(env or {})}
        self.output = state_dir.parent / f"up-{time.monotonic_ns()}.out"
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(
                [*CORRAL, "up", "--port", str(port or free_port()), "--log-dir", str(state_dir / "logs"), *extra],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"corral up exited with {self.process.returncode}:\n{self.text}")
            return "Corral is up" in self.text and (self.state_dir / "corral.json").exists()

        poll(ready, "corral up to be ready")

    def wait_for_line(self, *parts: str, timeout: float = READY_S) -> str:
        def line() -> str | None:
            return next((line for line in self.text.splitlines() if all(p in line for p in parts)), None)

        try:
            return poll(line, f"a line with {parts}", timeout)  # type: ignore[return-value]
        except AssertionError:
            raise AssertionError(f"no line with {parts} in:\n{self.text}") from None

    def children(self) -> dict[str, int]:
        """``name-replica`` -> pid, from the state directory's ``corral.json``."""
        info = json.loads((self.state_dir / "corral.json").read_text())
        return {f"{p['name']}-{p['replica']}": p["pid"] for p in info["processes"]}

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Up]]:
    """Start `corral up`s on ``tmp_path / "state"`` (or another directory); kill what is left at the end."""
    started: list[Up] = []
    dirs: set[Path] = set()

    def start(*extra: str, state_dir: Path | None = None, **options: object) -> Up:
        state = state_dir or tmp_path / "state"
        dirs.add(state)
        up = Up(state, *extra, **options)  # type: ignore[arg-type]
        started.append(up)
        return up

    try:
        yield start
    finally:
        for up in started:
            with contextlib.suppress(Exception):
                up.stop(timeout=30)
        for state in dirs:
            for pid in processes_of(state):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def request_succeeds(env: dict[str, str], tenant: str = "acme") -> bool:
    result = corral(env, "request", "--tenant", tenant, "--no-follow", "--timeout", "10", "where is my order?")
    return result.returncode == 0 and result.stdout.startswith("Order ")


def alive(pid: int, identity: str | None) -> bool:
    return identity is not None and start_time(pid) == identity


# ---- restarts ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def running(tmp_path_factory) -> Iterator[Up]:
    state_dir = tmp_path_factory.mktemp("supervised") / "state"
    up = Up(state_dir)
    try:
        up.wait_ready()
        yield up
    finally:
        up.stop(timeout=30)
        for pid in processes_of(state_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("name", ["router-0", "graph-0", "tools-0", "auth-0", "nats-server-0"])
def test_a_killed_process_is_restarted_and_requests_succeed_again(running, name):
    old = running.children()[name]
    os.kill(old, signal.SIGKILL)
    line = running.wait_for_line(f"pid {old}", "SIGKILL", "restarted")
    assert name.rsplit("-", 1)[0] in line
    new = poll(lambda: running.children()[name] != old and running.children()[name], f"a new {name} pid")
    assert f"pid {new}" in line
    poll(lambda: request_succeeds(running.env), "a request to succeed after the restart")
    assert running.process.poll() is None


def test_a_service_that_keeps_crashing_stops_everything_and_shows_its_log(launch, tmp_path):
    # A site hook makes every router started after the marker exists crash at once.
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    marker = tmp_path / "crash-router"
    (hooks / "sitecustomize.py").write_text(
        textwrap.dedent(f"""
        import os, sys
        if "services.router" in sys.orig_argv and os.path.exists({str(marker)!r}):
            print("router crashing on purpose", file=sys.stderr, flush=True)
            os._exit(3)
        """)
    )
    pythonpath = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
    up = launch(env={"PYTHONPATH": pythonpath})
    up.wait_ready()
    marker.touch()
    os.kill(up.children()["router-0"], signal.SIGKILL)
    code = up.process.wait(timeout=100)
    assert code != 0
    assert "router" in up.text and "keeps crashing" in up.text
    assert "router crashing on purpose" in up.text  # the tail of its log
    assert processes_of(up.state_dir) == []


# ---- signals -------------------------------------------------------------------------------

SLOW_DEFINITIONS = """
tools:
  - name: slow_tool
    description: Takes a few seconds, so a request is in flight when the system is stopped.
    python: {callable: "slow_tools:slow"}
    parameters: {type: object, properties: {query: {type: string}}, required: [query]}
graphs:
  - name: slow
    entry: work
    nodes:
      work: {kind: tool, tool: slow_tool, args: {query: $input.text}}
      answer: {kind: respond, template: "slow answer: {work.text}"}
    edges:
      - {from: work, to: answer}
      - {from: answer, to: end}
tenants:
  - tenant: acme
    default_route: slow
    routes: {slow: {pattern: graph, graph: slow}}
    tools: [slow_tool]
"""

SLOW_TOOL = """
import asyncio, os
from pathlib import Path

async def slow(ctx, query):
    Path(os.environ["SLOW_TOOL_STARTED"]).touch()
    await asyncio.sleep(3)  # the work itself, not a synchronisation
    return {"text": query}
"""


@pytest.mark.parametrize(
    ("how", "sig"),
    [("group", signal.SIGINT), ("group", signal.SIGHUP), ("process", signal.SIGTERM)],
    ids=["ctrl-c-to-the-group", "hangup-to-the-group", "sigterm-to-corral-up"],
)
def test_stopping_lets_an_in_flight_request_finish_and_stops_the_broker_last(launch, tmp_path, how, sig):
    state_dir = tmp_path / "state"
    (state_dir / "definitions").mkdir(parents=True)
    (state_dir / "definitions" / "slow.yaml").write_text(SLOW_DEFINITIONS)
    code = tmp_path / "py"
    code.mkdir()
    (code / "slow_tools.py").write_text(SLOW_TOOL)
    started = tmp_path / "slow-tool-started"
    pythonpath = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))
    up = launch("--no-demo", env={"PYTHONPATH": pythonpath, "SLOW_TOOL_STARTED": str(started)})
    up.wait_ready()
    request = subprocess.Popen(
        [*CORRAL, "request", "--tenant", "acme", "--no-follow", "please wait"],
        env=up.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        poll(started.exists, "the slow tool to start")
        if how == "group":
            os.killpg(up.process.pid, sig)  # what a terminal does on Ctrl-C or hangup
        else:
            up.process.send_signal(sig)
        output, _ = request.communicate(timeout=60)
    finally:
        if request.poll() is None:
            request.kill()
    assert request.returncode == 0, output
    assert output.strip() == "slow answer: please wait"
    assert up.process.wait(timeout=60) == 0, up.text
    broker_log = (state_dir / "logs" / "nats.log").read_text()
    assert 'Trapped "terminated" signal' in broker_log and "interrupt" not in broker_log and "hangup" not in broker_log
    for name in SERVICES:
        assert "service_stopped" in (state_dir / "logs" / f"{name}-0.log").read_text()
    assert processes_of(state_dir) == []


def test_ctrl_c_while_starting_stops_whatever_was_started(launch, tmp_path):
    up = launch()
    poll(lambda: "Server is ready" in _read(tmp_path / "state" / "logs" / "nats.log"), "the broker to start")
    os.killpg(up.process.pid, signal.SIGINT)  # the services are starting (or, on a fast day, ready)
    assert up.process.wait(timeout=60) == 0, up.text
    assert processes_of(up.state_dir) == []
    assert not (up.state_dir / "corral.json").exists() and not (up.state_dir / "processes.json").exists()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# ---- start-up failures ---------------------------------------------------------------------


def test_a_broker_that_cannot_take_its_port_stops_corral_up_at_once_with_its_error(launch, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = launch(port=port)
        try:
            code = up.process.wait(timeout=45)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"corral up still running with port {port} taken:\n{up.text}") from None
    assert code != 0
    assert "address already in use" in up.text and str(port) in up.text
    assert "Corral is up" not in up.text
    logs = tmp_path / "state" / "logs"
    assert sorted(p.name for p in logs.glob("*.log")) == ["nats.log"]  # no service was started


def test_a_second_corral_up_on_the_same_state_dir_refuses_and_touches_nothing(launch, tmp_path):
    first = launch()
    first.wait_ready()
    state_dir = tmp_path / "state"
    before = {name: (state_dir / name).read_bytes() for name in ("corral.json", "nats.conf", "secrets.json")}
    second = launch()
    assert second.process.wait(timeout=45) != 0
    assert f"pid {first.process.pid}" in second.text
    assert "Corral is up" not in second.text
    assert {name: (state_dir / name).read_bytes() for name in before} == before
    assert request_succeeds(first.env)
    assert first.stop() == 0


def test_the_next_corral_up_stops_what_a_killed_one_left_running(launch, tmp_path):
    first = launch()
    first.wait_ready()
    children = first.children()
    identities = {name: start_time(pid) for name, pid in children.items()}
    first.process.kill()
    first.process.wait()
    # Its children have sessions of their own: they outlive it, as after a kill -9.
    assert all(alive(pid, identities[name]) for name, pid in children.items())

    second = launch()
    second.wait_ready()
    line = second.wait_for_line("stopped", "left running")
    assert all(f"pid {pid}" in line for pid in children.values()), line
    assert not any(alive(pid, identities[name]) for name, pid in children.items())
    assert request_succeeds(second.env)
    assert second.stop() == 0
