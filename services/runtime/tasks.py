"""Stopping a background task for certain.

Python 3.11's ``asyncio.wait_for`` returns its awaitable's result when a cancellation arrives just
as that awaitable completes: the cancellation is lost. nats-py waits with it in every request,
fetch and flush, so a loop cancelled once while it waits for the broker may carry on, and whoever
awaits its end waits for ever. (Measured on the audit writer as it was, one append awaited after
another: a cancellation sent at a random moment of a busy write was lost 167 times in 300; the
writer then parked on its next wait, and the tools service never finished its SIGTERM.) Corral's
own waits use ``asyncio.timeout()``, which has no such gap, and a task that must end is stopped
with :func:`cancel_and_wait`, which cancels it again until it has ended.
"""

from __future__ import annotations

import asyncio
from typing import Any

# How long a cancelled task may take to end before it is cancelled again (its own clean-up, such
# as an unsubscribe, takes far less).
RECANCEL_S = 0.1


def keep_cancelling(task: asyncio.Task[Any], every_s: float = RECANCEL_S) -> None:
    """Cancel ``task`` now, and again every ``every_s`` seconds until it has ended (for a stop
    that cannot wait for it)."""
    if not task.done():
        task.cancel()
        task.get_loop().call_later(every_s, keep_cancelling, task, every_s)


async def cancel_and_wait(task: asyncio.Task[Any], every_s: float = RECANCEL_S) -> None:
    """Cancel ``task`` until it has ended and wait for that; raise what it raised, if it ended
    with an error other than its cancellation."""
    keep_cancelling(task, every_s)
    await asyncio.wait({task})
    if not task.cancelled() and (error := task.exception()) is not None:
        raise error
