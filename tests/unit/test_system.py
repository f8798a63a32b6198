"""The supervisor's parts that need no broker: restart policy, process identity, the lock, orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.processes import (
    PROCESSES_FILE,
    RUNTIME_FILE,
    CrashHistory,
    RestartPolicy,
    describe_exit,
    process_identity,
    stop_orphans,
)
from corral.system import StateDirBusy, System

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


@pytest.fixture
def sleeper():
    """A process in a session of its own, as `corral up`'s children are; killed at the end."""
    process = subprocess.Popen(SLEEPER, start_new_session=True)
    yield process
    process.kill()
    process.wait()


def test_restart_delays_double_from_half_a_second_up_to_ten():
    history = CrashHistory(RestartPolicy(max_crashes=100))
    delays = [history.crashed(now=float(i * 100), ran_for=1.0) for i in range(8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_a_child_that_ran_stably_restarts_after_the_first_delay_again():
    history = CrashHistory(RestartPolicy())
    history.crashed(now=0.0, ran_for=1.0)
    history.crashed(now=1.0, ran_for=1.0)
    assert history.crashed(now=200.0, ran_for=120.0) == 0.5


def test_the_fifth_exit_within_a_minute_gives_up():
    history = CrashHistory(RestartPolicy())
    assert all(history.crashed(now=float(i), ran_for=0.1) is not None for i in range(4))
    assert history.crashed(now=4.0, ran_for=0.1) is None


def test_exits_older_than_the_window_are_forgotten():
    history = CrashHistory(RestartPolicy())
    for at in (0.0, 1.0, 2.0, 3.0):
        history.crashed(now=at, ran_for=0.1)
    assert history.crashed(now=70.0, ran_for=0.1) is not None


def test_an_exit_is_described_by_its_signal_or_code():
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(3) == "exited with code 3"


def test_a_process_identity_is_stable_and_ends_with_the_process(sleeper):
    identity = process_identity(sleeper.pid)
    assert identity is not None and process_identity(sleeper.pid) == identity
    sleeper.kill()
    deadline = time.monotonic() + 30
    while process_identity(sleeper.pid) is not None:  # a zombie counts as gone
        assert time.monotonic() < deadline
        time.sleep(0.02)  # polling with a deadline


def test_a_second_owner_of_a_state_dir_is_told_the_first_ones_pid(tmp_path):
    first = System(tmp_path)
    first.lock()
    with pytest.raises(StateDirBusy, match=f"pid {os.getpid()}"):
        System(tmp_path).lock()
    first.stop()  # releases the lock
    second = System(tmp_path)
    second.lock()
    second.stop()


async def test_a_start_refused_by_the_lock_writes_nothing(tmp_path):
    holder = System(tmp_path)
    holder.lock()
    (tmp_path / RUNTIME_FILE).write_text('{"nats_url": "nats://127.0.0.1:1"}')
    try:
        with pytest.raises(StateDirBusy):
            await System(tmp_path).start()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["corral.lock", RUNTIME_FILE])
    finally:
        holder.stop()


def _record(state_dir: Path, pid: int, identity: str | None) -> None:
    entry = {"name": "router", "replica": 0, "pid": pid, "identity": identity}
    (state_dir / PROCESSES_FILE).write_text(json.dumps({"pid": 1, "processes": [entry]}))


def test_a_process_left_running_by_a_killed_owner_is_stopped(tmp_path, sleeper):
    _record(tmp_path, sleeper.pid, process_identity(sleeper.pid))
    said: list[str] = []
    assert stop_orphans(tmp_path, said.append) == [f"router-0 pid {sleeper.pid}"]
    assert sleeper.wait(timeout=30) == -signal.SIGTERM
    assert len(said) == 1 and f"pid {sleeper.pid}" in said[0]
    assert not (tmp_path / PROCESSES_FILE).exists()


def test_a_recycled_pid_is_never_signalled(tmp_path, sleeper):
    _record(tmp_path, sleeper.pid, "not-its-start-time")
    said: list[str] = []
    assert stop_orphans(tmp_path, said.append) == []
    assert sleeper.poll() is None and said == []


def test_corral_up_waits_for_a_service_while_it_makes_progress_and_gives_up_when_it_stops():
    from corral.system import Patience

    now, used = [0.0], [0.0]
    patience = Patience(30, lambda: used[0], clock=lambda: now[0])
    for _ in range(10):  # 100 s of loading, using CPU all along: still waited for
        now[0] += 10
        used[0] += 5
        assert not patience.exhausted()
    now[0] += 29  # then nothing: given up 30 s after the last progress
    assert not patience.exhausted()
    now[0] += 2
    assert patience.exhausted() and "no progress for 30s" in patience.why()
    blind = Patience(30, lambda: None, clock=lambda: now[0])  # no /proc: 30 s in all
    now[0] += 31
    assert blind.exhausted() and blind.why() == "not within 30s"
