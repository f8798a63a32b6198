"""A service with one durable operation, for the runtime's durable-consumer tests.

``python -m tests.support.durable_worker`` runs it as a process of its own (configured by
``CORRAL_NATS_URL``, ``WORKER_STREAM`` and ``WORKER_MARKERS``) whose handler writes
``<markers>/<tool>.started`` and then never finishes: the test kills it there, mid-message.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from contracts.envelope import Kind, ToolCall
from services.runtime import loop as event_loop
from services.runtime.manifest import Durable, Manifest
from services.runtime.service import Service
from services.runtime.settings import Settings

ACK_WAIT_S = 1.0


def work_subject(stream: str) -> str:
    return f"t.*.{stream.lower()}.item"


def manifest(stream: str) -> Manifest:
    operation = Durable("item", stream, work_subject(stream), Kind.TOOL_CALL, ToolCall, "a unit of work", ACK_WAIT_S)
    return Manifest("worker", "handles units of work from a stream", (operation,), audit=False)


def build(settings: Settings, stream: str, on_item: Callable[[Any], Awaitable[None]]) -> Service:
    service = Service(manifest(stream), settings)
    service.handler("item")(on_item)
    return service


async def _main() -> None:
    markers = Path(os.environ["WORKER_MARKERS"])

    async def hang(req: Any) -> None:
        (markers / f"{req.payload.tool}.started").write_text(str(os.getpid()))
        await asyncio.Event().wait()

    service = build(Settings(log_level="warning"), os.environ["WORKER_STREAM"], hang)
    await service.run()


if __name__ == "__main__":
    event_loop.run(_main())
