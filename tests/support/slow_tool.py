"""A tool that waits until the test releases it, to hold a message in flight."""

from __future__ import annotations

import asyncio

started = asyncio.Event()
release = asyncio.Event()


async def wait_for_release(ctx) -> dict:
    started.set()
    await release.wait()
    return {"tenant": ctx.tenant_id, "released": True}
