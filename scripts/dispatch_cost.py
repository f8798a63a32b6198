"""What one message costs each service in isolation: ``python scripts/dispatch_cost.py [--count N]``.

Runs the router's, the graph's and the tools service's whole dispatch (decode, guard, handler,
encode) on the ``bench_five`` run's messages with a stand-in connection, in a tight loop on this
process's event loop, and prints microseconds per message (the median of five batches). The
graph's stand-in answers its tool call at once, so its figure covers both halves of the run.
Compare with ``scripts/hop_trace.py``, which shows the same work inside a running system.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nats.aio.msg import Msg
from pydantic_core import to_json

from contracts import subjects
from contracts.envelope import GraphRun, Kind, RouterRequest, ToolCall, envelope_of, new_envelope_json
from corral.demo import DEFINITIONS as DEMO_DEFINITIONS
from corral.demo.payments import URL_VARIABLE as PAYMENTS_URL_VARIABLE
from services.registry import BY_NAME
from services.runtime import loop as event_loop
from services.runtime.catalog import load_catalog
from services.runtime.requests import Requester
from services.runtime.service import Service
from services.runtime.settings import Settings

TENANT = "bench"
NO_STATS = False
TEXT = "where is my order?"


class _StandIn:
    """Takes publishes; answers a request (a publish with a reply subject) with ``answer``."""

    def __init__(self, answer: bytes = b"") -> None:
        self.answer = answer
        self.requester: Requester | None = None
        self.last = b""  # the last message the service sent

    def new_inbox(self) -> str:
        return "_INBOX._bench.standin"

    async def subscribe(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "", headers: Any = None) -> None:
        self.last = payload
        if reply and self.requester is not None:
            self.requester._take_reply(Msg(_client=None, subject=reply, reply="", data=self.answer))


class _NoStats:
    """Statistics that count nothing (``--no-stats``: what the statistics cost per message)."""

    def start(self, tenant: str) -> None:
        return None

    def finish(self, record: Any, seconds: float, error: str | None = None) -> None:
        return None

    def refuse(self, tenant: str | None, kind: str) -> None:
        return None


async def _service(name: str, answer: bytes = b"") -> Service:
    # The demo refund tool's URL needs its payments API's; no call here reaches it.
    os.environ.setdefault(PAYMENTS_URL_VARIABLE, "http://127.0.0.1:9")
    settings = Settings(log_level="warning", definitions=DEMO_DEFINITIONS)
    service = Service(dataclasses.replace(BY_NAME[name], audit=False), settings)
    register = importlib.import_module(f"services.{name}.handlers").register
    register(service, load_catalog(settings.definitions_path()))
    stand_in = _StandIn(answer)
    service.nc = stand_in  # type: ignore[assignment]
    service.requester = stand_in.requester = Requester(stand_in)
    await service.requester.start()
    for liveness in service.watched.values():
        liveness.saw(True)
    return service


async def _cost(service: Service, subject: str, reply: str, body: bytes, count: int) -> float:
    op = service.manifest.consumes[0]
    envelope_type = envelope_of(op.payload)
    handler = service.handlers[op.name]
    stats = _NoStats() if NO_STATS else service.stats.operation(op.name, op.subject, service.name)
    msg = Msg(_client=None, subject=subject, reply=reply, data=body)

    async def dispatch() -> None:
        await service._dispatch(op, envelope_type, handler, stats, msg, reply)  # type: ignore[arg-type]

    await dispatch()
    if b'"kind":"error"' in service.nc.last:  # type: ignore[attr-defined]
        raise SystemExit(f"{service.name} refused the message: {service.nc.last[:300]!r}")  # type: ignore[attr-defined]
    batches = []
    for _ in range(6):  # the first batch warms up
        started = time.perf_counter()
        for _ in range(count):
            await dispatch()
        batches.append((time.perf_counter() - started) / count * 1e6)
    return statistics.median(batches[1:])


async def main(count: int) -> None:
    from corral.demo.tools import find_order

    deadline = time.time() + 3600
    router = await _service("router")
    request = RouterRequest(target="bench_five", input={"text": TEXT}, stream=False)
    body = new_envelope_json(Kind.REQUEST, TENANT, request, run_id="bench-run", deadline=deadline)
    inbox = f"{subjects.inbox_prefix(TENANT)}.standin.1"
    print(f"router {await _cost(router, subjects.router_request(TENANT, 'dev'), inbox, body, count):7.1f} us")

    tool_result = to_json(find_order(TENANT, TEXT))
    graph = await _service("graph", b'{"kind":"result","tenant_id":"bench","payload":{"output":' + tool_result + b"}}")
    run = GraphRun(graph="bench_five", input={"text": TEXT}, stream=False)
    body = new_envelope_json(Kind.GRAPH_RUN, TENANT, run, run_id="bench-run", deadline=deadline)
    print(f"graph  {await _cost(graph, subjects.graph_run(TENANT), inbox, body, count):7.1f} us")

    tools = await _service("tools")
    call = ToolCall(tool="orders_lookup", arguments={"query": TEXT})
    body = new_envelope_json(Kind.TOOL_CALL, TENANT, call, run_id="bench-run", deadline=deadline)
    reply = "_INBOX._graph.standin.1"
    print(f"tools  {await _cost(tools, subjects.tool_call(TENANT, 'orders_lookup'), reply, body, count):7.1f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000, help="messages per batch")
    parser.add_argument("--no-stats", action="store_true", help="dispatch without per-operation statistics")
    arguments = parser.parse_args()
    NO_STATS = arguments.no_stats
    event_loop.run(main(arguments.count))
