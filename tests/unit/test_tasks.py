"""Stopping background tasks for certain: a task that loses a cancellation (as Python 3.11's
asyncio.wait_for loses one that arrives with the reply it awaited) is cancelled again until it ends."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from services.runtime.liveness import Liveness
from services.runtime.tasks import cancel_and_wait


async def loses_one_cancellation() -> None:
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()
    await asyncio.Event().wait()


async def test_a_task_that_loses_a_cancellation_is_cancelled_again_until_it_ends():
    task = asyncio.create_task(loses_one_cancellation())
    await asyncio.sleep(0)
    async with asyncio.timeout(3):
        await cancel_and_wait(task, every_s=0.01)
    assert task.cancelled()


async def test_what_a_stopped_task_raised_is_raised():
    async def fails_when_cancelled() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("broken clean-up") from None

    task = asyncio.create_task(fails_when_cancelled())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="broken clean-up"):
        await cancel_and_wait(task)


async def test_a_liveness_probe_stops_even_when_its_request_loses_the_cancellation():
    class Broker:
        lost = False

        async def request(self, subject, payload, timeout):
            try:
                await asyncio.sleep(0.005)  # the answer
            except asyncio.CancelledError:
                if self.lost:
                    raise
                self.lost = True  # the first cancellation came with the answer, and was lost

    probe = Liveness("tools", interval_s=0.01)
    probe.start(Broker())
    await asyncio.sleep(0)
    stopping = asyncio.create_task(probe.stop())
    done, _ = await asyncio.wait({stopping}, timeout=3)
    assert done, "the probe kept probing after stop()"
