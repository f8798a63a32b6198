"""Python tools for the workflow tests: each records what it was asked, keyed by idempotency key."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

from services.toolkit.context import ToolContext

# (tenant, tool) -> idempotency keys seen, in order (a key twice is a retry of the same call).
CALLS: dict[tuple[str, str], list[str | None]] = defaultdict(list)
FAILURES: dict[str, int] = {}  # key -> failures left before it succeeds
# held(): the values of its calls, set as a call begins, and opened to let the calls return.
HELD: list[int] = []
ENTERED = asyncio.Event()
GATE = asyncio.Event()


def reset() -> None:
    global ENTERED, GATE
    CALLS.clear()
    FAILURES.clear()
    HELD.clear()
    ENTERED, GATE = asyncio.Event(), asyncio.Event()


async def held(value: int) -> int:
    """A function step that begins (``ENTERED``) and returns only once ``GATE`` is open."""
    HELD.append(value)
    ENTERED.set()
    await GATE.wait()
    return value + 1


async def step(ctx: ToolContext, value: int = 0) -> dict[str, Any]:
    CALLS[(ctx.tenant_id, "step")].append(ctx.idempotency_key)
    return {"value": value + 1, "tenant": ctx.tenant_id}


async def flaky(ctx: ToolContext, value: int = 0) -> dict[str, Any]:
    """Fails (a tool failure) as often as FAILURES says for its key, then succeeds."""
    CALLS[(ctx.tenant_id, "flaky")].append(ctx.idempotency_key)
    key = ctx.idempotency_key or ""
    left = FAILURES.get(key, FAILURES.get("*", 0))
    if left > 0:
        FAILURES[key] = left - 1
        raise RuntimeError("the payment provider is down")
    return {"value": value + 1}


async def undo(ctx: ToolContext, value: Any = None) -> dict[str, Any]:
    CALLS[(ctx.tenant_id, "undo")].append(ctx.idempotency_key)
    return {"undone": value}


def double(value: int) -> int:
    return value * 2


async def add_one(value: int) -> int:
    return value + 1


async def waitfor_status(client: Any, run_id: str, status: str, timeout: float = 20.0) -> dict[str, Any]:
    """The run's history once it says ``status`` (polling the query: the test's clock)."""
    deadline = time.monotonic() + timeout
    while True:
        shown = await client.show(run_id)
        if shown["run"]["status"] == status:
            return shown
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} is {shown['run']['status']}, not {status}")
        await asyncio.sleep(0.05)
