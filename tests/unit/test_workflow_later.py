"""``Later``: work that begins after a delay unless cancelled first (a run's lease renewals and
its first index line), a timer until it begins."""

from __future__ import annotations

import asyncio

import pytest

from services.workflow.driver import Later


async def test_cancelled_before_it_begins_it_never_runs_and_is_settled_at_once() -> None:
    ran = []

    async def work() -> None:
        ran.append(1)

    later = Later(0, work)  # due at the loop's next turn
    later.cancel()
    await asyncio.wait_for(later.settled(), 1)
    for _ in range(3):  # turns of the loop in which an uncancelled timer would have fired
        await asyncio.sleep(0)
    assert ran == []


async def test_not_cancelled_it_is_waited_for_until_it_has_run() -> None:
    ran = asyncio.Event()

    async def work() -> None:
        ran.set()

    later = Later(0.01, work)
    await asyncio.wait_for(later.settled(), 1)
    assert ran.is_set()


async def test_stop_cancels_work_that_has_begun_and_waits_for_its_end() -> None:
    began, ended = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        began.set()
        try:
            await asyncio.sleep(60)
        finally:
            ended.set()

    later = Later(0, work)
    await asyncio.wait_for(began.wait(), 1)
    await asyncio.wait_for(later.stop(), 1)
    assert ended.is_set()


async def test_stop_raises_what_the_work_raised_and_settled_does_not() -> None:
    async def work() -> None:
        raise RuntimeError("renewal failed")

    later = Later(0, work)
    await asyncio.wait_for(later.settled(), 1)
    with pytest.raises(RuntimeError, match="renewal failed"):
        await later.stop()
