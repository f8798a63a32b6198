"""What ``corral bench``'s ``monitor_cpu_share`` is made of (corral/bench/cpu.py): a process's CPU
time read from /proc, each replica's CPU answering statistics requests (``stats_cpu_s`` in its
snapshot), and the share: the monitoring's CPU per second it ran, times the phases' duration,
over the system's CPU in those phases, the bench's own readings taken off."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from corral.bench.cpu import MonitorShare, Reading, process_cpu_s
from services.monitor.manifest import MANIFEST
from services.runtime.service import Service
from services.runtime.settings import Settings


def burn(seconds: float) -> None:
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        pass


def test_a_processes_cpu_time_grows_by_what_it_used():
    before = process_cpu_s(os.getpid())
    burn(0.05)
    after = process_cpu_s(os.getpid())
    assert before is not None and after is not None and after - before >= 0.045


def test_a_process_that_is_gone_has_no_cpu_time():
    assert process_cpu_s(2**22 + 12345) is None  # above the kernel's pid limit


async def test_a_replica_reports_the_cpu_it_spent_answering_statistics():
    service = Service(MANIFEST, Settings(log_level="warning"))
    sent: list[bytes] = []

    async def respond(body: bytes) -> None:
        sent.append(body)

    assert service.stats.snapshot()["stats_cpu_s"] == 0
    for _ in range(3):
        await service.answer_stats(SimpleNamespace(reply="_INBOX._admin.x", data=b"", respond=respond))
    assert len(sent) == 3 and service.stats.stats_cpu_s > 0
    assert service.stats.snapshot()["stats_cpu_s"] == round(service.stats.stats_cpu_s, 6)


class Readings:
    """Scripted readings: (seconds, {pid: cpu}, {pid: stats_cpu_s}) one after another."""

    def __init__(self, *found: tuple[float, dict, dict]) -> None:
        self.found = list(found)

    async def __call__(self) -> Reading:
        at, cpu, stats = self.found.pop(0)
        return Reading(at, cpu, stats)


@pytest.fixture
def share(monkeypatch):
    # pid 1 the broker, 2 a service, 3 the monitor
    found = MonitorShare(nc=None, pids=[1, 2, 3], monitors={3}, services={"router": 1, "monitor": 1})

    def script(*readings):
        scripted = Readings(*readings)

        async def reading(self=found) -> Reading:
            if self._since is not None:
                self._readings += 1
            return await scripted()

        monkeypatch.setattr(found, "reading", reading)

    return found, script


async def test_the_share_is_the_monitorings_cpu_per_second_times_the_phases_over_the_systems(share):
    found, script = share
    script(
        (0.0, {1: 0.0, 2: 0.0, 3: 0.0}, {2: 0.0, 3: 0.0}),  # resume
        (1.0, {1: 0.5, 2: 0.4, 3: 0.01}, {2: 0.001, 3: 0.0}),  # a phase of 2 s begins
        (3.0, {1: 1.5, 2: 1.2, 3: 0.03}, {2: 0.003, 3: 0.0}),  # it ends: the system used 1.82 s
        (10.0, {1: 2.0, 2: 1.6, 3: 0.10}, {2: 0.010, 3: 0.0}),  # pause: 10 s of running
    )
    found.reading_s = (0.0001, 0.00005)  # what one of the bench's readings costs
    await found.resume()
    await found.measured(_nothing())
    await found.pause()
    # Three readings were answered while it ran (the pause's own is not in its figures).
    assert found.monitor_s == pytest.approx(0.10 - 3 * 0.00005)
    assert found.answering_s == pytest.approx(0.010 - 3 * 0.0001)
    assert found.running_s == 10.0 and found.phases_s == 2.0
    assert found.system_s == pytest.approx(1.0 + 0.8 + 0.02)
    cost_per_s = (found.monitor_s + found.answering_s) / 10.0
    assert found.share == pytest.approx(cost_per_s * 2.0 / 1.82)


async def test_the_cost_of_a_reading_is_the_least_of_a_few_in_a_row(share):
    found, script = share
    script(
        (0.0, {}, {2: 0.0, 3: 0.0}),
        (0.1, {}, {2: 0.0003, 3: 0.0001}),
        (0.2, {}, {2: 0.0013, 3: 0.0004}),  # a poll of the monitor's fell in between
        (0.3, {}, {2: 0.0016, 3: 0.0005}),
    )
    await found.calibrate(readings=4)
    assert found.reading_s == pytest.approx((0.0003, 0.0001))


async def test_nothing_measured_is_no_share(share):
    found, _ = share
    assert found.share is None and found.cost_per_s is None


async def _nothing() -> None:
    return None
