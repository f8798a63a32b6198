"""The monitor's share of the system's CPU, for ``corral bench`` (``monitor_cpu_share``).

Throughput with the monitor running over paused (``monitor_ratio``) is inside this machine's
noise; CPU time is not a race against the noise. The monitor's cost is the CPU time of the
monitor's processes plus what every service replica spent answering statistics requests (each
reports it as ``stats_cpu_s`` in its statistics, services/runtime/service.py); the share is that
over the CPU time of every process of the system (the broker, the services, the demo payments
API) during the bench's Corral phases (Corral's latency and throughput, with progress events,
graph runs), the monitor running.

The monitor's cost comes in bursts, one poll a second, so over a phase of a fraction of a second
it would be zero polls or one, by chance: the cost is taken per second, over all the time the
monitor ran during the rounds (its paused phases left out), times the phases' duration. The
bench's own readings ask every replica for its statistics too: what one reading costs them (the
least of a few back-to-back readings' ``stats_cpu_s`` increases) is taken off.

A process's CPU time is the sum of its threads' run time in ``/proc/<pid>/task/*/schedstat``
(nanoseconds; a thread that ends between two readings takes its time with it, rare in these
processes), else ``utime + stime`` from ``/proc/<pid>/stat`` (clock ticks of 10 ms: too coarse
for phases of a fraction of a second, so only a fallback).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts import subjects

STATS_WINDOW_S = 1.0  # how long to wait for every replica's statistics


def process_cpu_s(pid: int) -> float | None:
    """The CPU time process ``pid`` has used, in seconds (None: it is gone, or this is not Linux)."""
    total_ns = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):  # a thread that ended meanwhile
                total_ns += int((task / "schedstat").read_text().split()[0])
    except OSError:
        return None
    if total_ns:
        return total_ns / 1e9
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


async def stats_cpu_s(nc: Any, services: dict[str, int]) -> dict[int, float]:
    """pid -> ``stats_cpu_s`` of every replica, asked on ``corral.stats.<service>`` (totals
    only); ``services`` is service -> how many replicas run (their answers are awaited)."""
    found: dict[int, float] = {}
    expected = sum(services.values())
    done = asyncio.Event()
    inbox = nc.new_inbox()

    async def collect(msg: Any) -> None:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            reply = json.loads(msg.data)
            found[int(reply["pid"])] = float(reply.get("stats_cpu_s", 0.0))
        if len(found) >= expected:
            done.set()

    sub = await nc.subscribe(f"{inbox}.*", cb=collect)
    try:
        for service in services:
            await nc.publish(subjects.stats(service), b'{"detail": false}', reply=f"{inbox}.{service}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), STATS_WINDOW_S)
    finally:
        await sub.unsubscribe()
    return found


@dataclass
class Reading:
    at: float  # time.monotonic()
    cpu: dict[int, float]  # pid -> its CPU time
    stats: dict[int, float]  # pid -> its stats_cpu_s


@dataclass
class MonitorShare:
    """The monitor's cost while it runs and the system's CPU in the phases measured.

    ``await resume()`` when the monitor runs (and after each pause), ``await pause()`` before
    it is paused and at the end; ``await measured(phase)`` around each phase."""

    nc: Any
    pids: list[int]  # every process of the system
    monitors: set[int]  # the monitor's
    services: dict[str, int]  # service -> replicas
    monitor_s: float = 0.0  # the monitor's CPU while it ran
    answering_s: float = 0.0  # the services' CPU answering statistics while it ran
    running_s: float = 0.0  # how long it ran
    system_s: float = 0.0  # the system's CPU in the phases
    phases_s: float = 0.0  # how long the phases took
    # What one of the bench's own readings costs the services and the monitor (:meth:`calibrate`).
    reading_s: tuple[float, float] = (0.0, 0.0)
    _since: Reading | None = None  # the reading the monitor's running time started with
    _readings: int = 0  # readings since then (each answered by every replica)

    async def reading(self) -> Reading:
        stats = await stats_cpu_s(self.nc, self.services)
        cpu = {pid: found for pid in self.pids if (found := process_cpu_s(pid)) is not None}
        if self._since is not None:
            self._readings += 1
        return Reading(time.monotonic(), cpu, stats)

    async def calibrate(self, readings: int = 5) -> None:
        """Measure what one reading costs the replicas it asks (the least of a few in a row)."""
        last = await self.reading()
        least: tuple[float, float] | None = None
        for _ in range(readings - 1):
            found = await self.reading()
            cost = self._answering(last, found)
            least = cost if least is None or sum(cost) < sum(least) else least
            last = found
        self.reading_s = least or (0.0, 0.0)

    async def resume(self) -> None:
        self._readings = 0
        self._since = await self.reading()

    async def pause(self) -> None:
        if self._since is None:
            return
        since, end = self._since, await self.reading()
        # Readings answered in between: the first and those since, not the last (whose answer
        # comes after its figures); ``_readings`` counted the last but not the first.
        readings = self._readings
        self._since = None
        services_reading, monitor_reading = self.reading_s
        services, _ = self._answering(since, end)
        self.answering_s += max(0.0, services - readings * services_reading)
        used = self._used(since, end)
        monitor = sum(used.get(pid, 0.0) for pid in self.monitors)
        self.monitor_s += max(0.0, monitor - readings * monitor_reading)
        self.running_s += end.at - since.at

    async def measured(self, phase: Awaitable[Any]) -> Any:
        """Run ``phase``, counting the system's CPU and the time it took."""
        before = await self.reading()
        try:
            return await phase
        finally:
            after = await self.reading()
            self.system_s += sum(self._used(before, after).values())
            self.phases_s += after.at - before.at

    def _used(self, before: Reading, after: Reading) -> dict[int, float]:
        return {pid: max(0.0, after.cpu[pid] - before.cpu[pid]) for pid in before.cpu.keys() & after.cpu.keys()}

    def _answering(self, before: Reading, after: Reading) -> tuple[float, float]:
        """The increase of ``stats_cpu_s`` between two readings: the services', the monitor's."""
        services = monitor = 0.0
        for pid in before.stats.keys() & after.stats.keys():
            increase = max(0.0, after.stats[pid] - before.stats[pid])
            if pid in self.monitors:
                monitor += increase
            else:
                services += increase
        return services, monitor

    @property
    def cost_per_s(self) -> float | None:
        """The monitor's and the answering's CPU seconds per second it ran."""
        return (self.monitor_s + self.answering_s) / self.running_s if self.running_s > 0 else None

    @property
    def share(self) -> float | None:
        """The monitoring's CPU in the phases (its cost per second times their duration) over the
        system's CPU in them; None: nothing measured."""
        cost = self.cost_per_s
        return cost * self.phases_s / self.system_s if cost is not None and self.system_s > 0 else None
