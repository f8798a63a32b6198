"""Which slow steps of an async tool count as holding the tools service's loop
(services/toolkit/isolation.py ``held_the_loop``): computing or blocking in the kernel does; waiting
for a core on a busy machine (a step slow by the wall clock alone) does not."""

from __future__ import annotations

import resource
import sys
import time
from types import SimpleNamespace

import pytest

from services.toolkit.isolation import held_the_loop, thread_usage

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread counts are Linux's")


def test_a_step_that_computes_holds_the_loop():
    before = thread_usage()
    spent = time.thread_time() + 0.06
    while time.thread_time() < spent:  # 60 ms of this thread's CPU, whatever the machine's speed
        pass
    assert held_the_loop(before, 0.1)


def test_a_step_that_sleeps_holds_the_loop():
    before = thread_usage()
    time.sleep(0.001)  # a voluntary context switch: blocked in the kernel
    assert held_the_loop(before, 0.1)


def test_a_step_slow_only_because_the_machine_was_busy_does_not():
    now = resource.getrusage(resource.RUSAGE_THREAD)
    # The same counts as now: no CPU used and no voluntary switch since (only preempted, if slow).
    before = SimpleNamespace(ru_utime=now.ru_utime, ru_stime=now.ru_stime, ru_nvcsw=now.ru_nvcsw)
    assert not held_the_loop(before, 0.1)


def test_where_nothing_is_counted_per_thread_the_wall_clock_decides():
    assert held_the_loop(None, 0.1)
