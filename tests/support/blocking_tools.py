"""Async tools that block the thread of the event loop they run on, as a tool calling
``time.sleep``, computing, or reading a socket without awaiting does; and one that behaves.

The events are ``threading`` ones: the loop a tool blocks may be the test's own, so a test waits
on them from a thread (``asyncio.to_thread(entered.wait, ...)``) or from another loop. Call
:func:`reset` at the start of each test.
"""

from __future__ import annotations

import asyncio
import threading
import time

entered = threading.Event()  # a call with hold=True is now holding its loop
release = threading.Event()  # set by the test: that call lets its loop go
returned = threading.Event()  # it has
started: list[str] = []  # the label of every call whose body began, in order


def reset() -> None:
    for event in (entered, release, returned):
        event.clear()
    started.clear()


def where() -> dict:
    thread = threading.current_thread()
    return {"thread": thread.name, "main_thread": thread is threading.main_thread()}


async def block_loop(
    ctx, seconds: float = 0.0, hold: bool = False, await_first: bool = False, await_after: bool = True, label: str = ""
) -> dict:
    """Blocks its loop's thread for ``seconds`` (time.sleep) or, with ``hold``, until the test sets
    ``release``; awaits before that with ``await_first``, and after it unless ``await_after`` is false."""
    if await_first:
        await asyncio.sleep(0)
    started.append(label or ctx.tenant_id)
    if hold:
        entered.set()
        release.wait(30)
        returned.set()
    elif seconds:
        time.sleep(seconds)
    if await_after:
        await asyncio.sleep(0)
    return {"tenant": ctx.tenant_id, **where()}


async def well_behaved(ctx) -> dict:
    """Waits the way I/O does, never blocking its loop."""
    await asyncio.sleep(0)
    return {"tenant": ctx.tenant_id, **where()}
