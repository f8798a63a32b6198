"""A tool that waits until the test releases it, to hold a message in flight.

Call :func:`reset` at the start of each test: the events belong to the event loop of the test
that made them.
"""

from __future__ import annotations

import asyncio

started = asyncio.Event()
release = asyncio.Event()


def reset() -> None:
    global started, release
    started, release = asyncio.Event(), asyncio.Event()


async def wait_for_release(ctx) -> dict:
    started.set()
    await release.wait()
    return {"tenant": ctx.tenant_id, "released": True}
