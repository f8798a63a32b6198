"""The processes of a system, seen from the outside: which one is which (so a recycled pid is
never signalled), how an exit reads, the restart policy, and stopping what a killed ``corral up``
left running. Used by :class:`corral.system.System`; docs/operations.md says what it does.
"""

from __future__ import annotations

import contextlib
import functools
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

from corral.state import RUNTIME_FILE

BROKER = "nats-server"  # the broker's name among the children
PROCESSES_FILE = "processes.json"  # the children, from the first spawn until a clean stop
ORPHAN_GRACE_S = 10.0  # how long a left-over process gets to stop after SIGTERM


def process_identity(pid: int) -> str | None:
    """What tells a running process apart from a later one given the same pid: its start time.

    None when no such process runs (gone, or a zombie nobody has reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        found = subprocess.run(["ps", "-o", "stat=,lstart=", "-p", str(pid)], capture_output=True, text=True)
        state, _, started = found.stdout.strip().partition(" ")
        return None if found.returncode != 0 or state.startswith("Z") else started.strip()
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    if fields[0] in ("Z", "X"):
        return None
    return f"{_boot_id()}:{fields[19]}"  # field 22 of proc(5): starttime, in ticks since boot


def cpu_seconds(pids: list[int]) -> float | None:
    """The CPU time the processes have used so far (user and system), or None where the system
    does not tell (no ``/proc``): how ``corral up`` sees that a starting service is at work."""
    total = 0.0
    try:
        for pid in pids:
            with contextlib.suppress(FileNotFoundError):  # exited: the supervisor sees to it
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime and stime
    except (OSError, IndexError, ValueError):
        return None
    return total if Path("/proc/self/stat").exists() else None


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@functools.cache
def _boot_id() -> str:
    """Start times count from boot: with the boot's id they stay unique across reboots."""
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass(frozen=True)
class RestartPolicy:
    """When a child that exited is started again, and when the supervisor gives up on it."""

    first_delay_s: float = 0.5
    max_delay_s: float = 10.0
    stable_after_s: float = 30.0  # a child that ran this long starts again from first_delay_s
    max_crashes: int = 5  # this many exits of one child within window_s: give up
    window_s: float = 60.0


@dataclass
class CrashHistory:
    """One child's recent exits, and the delay before its next start."""

    policy: RestartPolicy
    exits: list[float] = field(default_factory=list)
    delay_s: float = 0.0

    def crashed(self, now: float, ran_for: float) -> float | None:
        """Record an exit; return the delay before restarting, or None to give up."""
        self.exits = [at for at in self.exits if now - at < self.policy.window_s] + [now]
        if len(self.exits) >= self.policy.max_crashes:
            return None
        if ran_for >= self.policy.stable_after_s or self.delay_s == 0:
            self.delay_s = self.policy.first_delay_s
        else:
            self.delay_s = min(self.policy.max_delay_s, self.delay_s * 2)
        return self.delay_s


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` at once, so a reader never sees half a file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(path)


def to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def stop_orphans(state_dir: Path, say: Callable[[str], None] = to_stderr) -> list[str]:
    """Stop the children a killed owner of ``state_dir`` left running: services first (SIGTERM,
    then SIGKILL after :data:`ORPHAN_GRACE_S`), then the broker. Only processes whose start time
    is the one recorded are touched, so a recycled pid is never signalled. Call it holding the
    directory's lock. Returns what was stopped (``name-replica pid N``), and says so in one line."""
    path = state_dir / PROCESSES_FILE
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except ValueError:
        recorded = {}
    left = [
        child
        for child in recorded.get("processes", [])
        if child.get("identity") is not None and process_identity(child["pid"]) == child["identity"]
    ]
    stopped: list[str] = []
    for group in ([c for c in left if c["name"] != BROKER], [c for c in left if c["name"] == BROKER]):
        for child in group:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child["pid"], signal.SIGTERM)
        deadline, killed = time.monotonic() + ORPHAN_GRACE_S, False
        running = list(group)
        while running:
            running = [c for c in running if process_identity(c["pid"]) == c["identity"]]
            if running and time.monotonic() > deadline:
                if killed:  # stuck in the kernel: go on, the start reports what is in the way
                    break
                for child in running:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child["pid"], signal.SIGKILL)
                deadline, killed = time.monotonic() + ORPHAN_GRACE_S, True
            if running:
                time.sleep(0.05)  # polling for the exits with a deadline
        stopped += [f"{c['name']}-{c['replica']} pid {c['pid']}" for c in group]
    if stopped:
        say(
            f"corral: stopped {len(stopped)} processes left running by an earlier corral up "
            f"(pid {recorded.get('pid', '?')}) that ended without stopping them: {', '.join(stopped)}"
        )
    path.unlink(missing_ok=True)
    (state_dir / RUNTIME_FILE).unlink(missing_ok=True)  # its URL is stale: no client should use it
    return stopped


# ---- the system ----------------------------------------------------------------------------
