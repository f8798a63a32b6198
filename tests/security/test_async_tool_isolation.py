"""An async tool that blocks the event loop stalls only its own tenant once it has been caught
(services/toolkit/isolation.py): its first offence quarantines it, its later calls run on their
tenant's own isolation loop, bounded, and a caller's deadline is kept whatever that loop does.

The blocking tools are ``tests/support/blocking_tools.py``; they block with ``time.sleep`` (long
enough to be past the threshold on any machine) or until the test releases them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import nats
import pytest
import yaml

from contracts import subjects
from contracts.definitions import PythonTool
from contracts.envelope import Envelope, Kind, ToolCall, deadline_in
from contracts.errors import DeadlineExceeded, RateLimited, Unavailable
from contracts.replies import decode_reply
from services.runtime.catalog import load_catalog
from services.runtime.service import Service
from services.toolkit.context import ToolContext
from services.toolkit.isolation import LoopIsolation
from services.toolkit.python_adapter import PythonAdapter
from services.toolkit.settings import ToolsSettings
from services.toolkit.watchdog import LoopWatchdog
from services.tools.handlers import register
from services.tools.manifest import MANIFEST
from tests.support import blocking_tools

BLOCKING = "tests.support.blocking_tools"
TOOLS = [
    {"name": "block_loop", "python": {"callable": f"{BLOCKING}:block_loop"}},
    {"name": "well_behaved", "python": {"callable": f"{BLOCKING}:well_behaved"}},
]
DEFINITIONS = {
    "tools": TOOLS,
    "tenants": [{"tenant": tenant, "tools": ["block_loop", "well_behaved"]} for tenant in ("acme", "globex")],
}
BLOCKS_THE_LOOP_S = 0.3  # three times the threshold below: a block on any machine


@pytest.fixture(autouse=True)
def fresh():
    blocking_tools.reset()
    yield
    blocking_tools.release.set()  # whatever a failed test left holding a loop lets it go


async def wait_for(event, timeout: float = 10.0) -> None:
    """Wait for a threading event without holding the test's loop."""
    assert await asyncio.to_thread(event.wait, timeout), "the tool never got there"


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


def joined(isolation: LoopIsolation) -> None:
    """Every isolation thread has ended (after close and release)."""
    for thread in isolation.threads():
        thread.join(10)
        assert not thread.is_alive(), f"{thread.name} is still running"


# ---- over the bus: the tools service on a real nats-server -----------------------------------


@pytest.fixture
async def tools_service(nats_url, tmp_path):
    """Start the tools service with the blocking tools (and settings given); stopped afterwards."""
    path = tmp_path / "tools.yaml"
    path.write_text(yaml.safe_dump(DEFINITIONS))
    running = []

    async def start(**settings):
        config = ToolsSettings(nats_url=nats_url, definitions=path, log_level="warning", **settings)
        service = Service(MANIFEST, config)
        registry = register(service, load_catalog(config.definitions_path()))
        await service.start()
        running.append((service, registry))
        return registry

    yield start
    blocking_tools.release.set()
    for service, registry in running:
        await service.stop()
        joined(registry.isolation)


@pytest.fixture
async def connect(nats_url):
    """Connections whose reply inbox is a tenant's, as an executor's, closed at the end."""
    opened = []

    async def open_for(tenant: str) -> nats.NATS:
        nc = await nats.connect(nats_url, inbox_prefix=subjects.inbox_prefix(tenant).encode())
        opened.append(nc)
        return nc

    yield open_for
    for nc in opened:
        await nc.close()


async def call(nc, tenant: str, tool: str, arguments: dict, *, deadline_s: float = 10.0):
    envelope = Envelope[ToolCall](
        kind=Kind.TOOL_CALL,
        tenant_id=tenant,
        run_id="run-1",
        deadline=deadline_in(deadline_s),
        payload=ToolCall(tool=tool, arguments=arguments),
    )
    reply = await nc.request(subjects.tool_call(tenant, tool), envelope.model_dump_json().encode(), timeout=10)
    return decode_reply(reply.data)


async def test_after_its_first_offence_a_blocking_tool_stalls_only_its_own_tenant(tools_service, connect):
    registry = await tools_service(tool_loop_block_ms=100)
    acme, globex = await connect("acme"), await connect("globex")

    # The first offence holds the service's loop once (nothing can stop a running step), and is
    # stopped at its next await with a retryable error.
    with pytest.raises(Unavailable, match="blocked the event loop"):
        await call(acme, "acme", "block_loop", {"seconds": BLOCKS_THE_LOOP_S})
    assert set(registry.isolation.quarantined) == {"block_loop"}

    # It blocks again, now on acme's isolation loop, until released.
    held = asyncio.create_task(call(acme, "acme", "block_loop", {"hold": True}, deadline_s=1.0))
    await wait_for(blocking_tools.entered)

    # Meanwhile everyone else is answered: globex's tools (the quarantined one too, on globex's own
    # isolation loop), the service's ping and its statistics.
    assert (await call(globex, "globex", "well_behaved", {}))["main_thread"] is True
    assert (await call(globex, "globex", "block_loop", {}))["thread"] == "corral-isolated-globex"
    ping = json.loads((await globex.request(subjects.ping("tools"), b"", timeout=5)).data)
    assert ping["pid"] == os.getpid()
    stats = json.loads((await globex.request(subjects.stats("tools"), b"{}", timeout=5)).data)
    assert [endpoint["name"] for endpoint in stats["endpoints"]] == ["call"]
    assert not blocking_tools.returned.is_set()  # all of that while acme's call held its loop

    # acme's caller gets its typed answer at its deadline, while the call still holds the loop...
    with pytest.raises(DeadlineExceeded):
        await held
    assert not blocking_tools.returned.is_set()
    # ...and acme's next call is refused at once instead of queueing behind it.
    with pytest.raises(Unavailable, match="has held the isolation loop of tenant 'acme'"):
        await call(acme, "acme", "block_loop", {})

    blocking_tools.release.set()
    await until(lambda: registry.isolation.held("acme") == 0)
    assert (await call(acme, "acme", "block_loop", {}))["thread"] == "corral-isolated-acme"


async def test_a_well_behaved_async_tool_is_not_quarantined(tools_service, connect):
    registry = await tools_service(tool_loop_block_ms=100)
    acme, globex = await connect("acme"), await connect("globex")
    with pytest.raises(Unavailable):
        await call(acme, "acme", "block_loop", {"seconds": BLOCKS_THE_LOOP_S})  # another tool is caught
    callers = [(acme, "acme"), (globex, "globex")] * 10
    answers = await asyncio.gather(*(call(nc, tenant, "well_behaved", {}) for nc, tenant in callers))
    assert all(answer["main_thread"] for answer in answers)  # on the service's own loop, as before
    assert set(registry.isolation.quarantined) == {"block_loop"}


async def test_an_operator_can_isolate_a_tool_from_its_first_call(tools_service, connect):
    registry = await tools_service(tool_isolated=["block_loop"])
    acme, globex = await connect("acme"), await connect("globex")
    held = asyncio.create_task(call(acme, "acme", "block_loop", {"hold": True}))
    await wait_for(blocking_tools.entered)  # the very first call, already on acme's own loop
    assert (await call(globex, "globex", "well_behaved", {}))["tenant"] == "globex"
    assert not blocking_tools.returned.is_set()
    blocking_tools.release.set()
    assert (await held)["thread"] == "corral-isolated-acme"
    assert registry.isolation.quarantined == {}  # it never blocked the service's loop


# ---- the adapter and its isolation, without a broker -----------------------------------------


def ctx(tenant: str = "acme", timeout_s: float = 10.0) -> ToolContext:
    return ToolContext(tenant_id=tenant, run_id="r", principal="p", timeout_s=timeout_s)


def adapter(isolation: LoopIsolation, tool: str = "block_loop") -> PythonAdapter:
    return PythonAdapter(tool, PythonTool(callable=f"{BLOCKING}:{tool}"), isolation=isolation)


@pytest.fixture
def isolations():
    """LoopIsolations made by the test, closed and their threads joined afterwards."""
    made: list[LoopIsolation] = []

    def make(**options) -> LoopIsolation:
        made.append(LoopIsolation(**options))
        return made[-1]

    yield make
    blocking_tools.release.set()
    for isolation in made:
        isolation.close()
        joined(isolation)


async def test_a_step_that_blocks_after_an_await_quarantines_the_tool_and_stops_the_call(isolations):
    isolation = isolations(block_s=0.1)
    tool = adapter(isolation)
    with pytest.raises(Unavailable, match="blocked the event loop"):
        await tool.call(ctx(), {"await_first": True, "seconds": BLOCKS_THE_LOOP_S})
    assert isolation.quarantined["block_loop"].tenant == "acme"
    assert isolation.quarantined["block_loop"].blocked_s >= BLOCKS_THE_LOOP_S
    assert (await tool.call(ctx(), {}))["thread"] == "corral-isolated-acme"


async def test_a_tool_that_blocks_and_finishes_in_one_step_keeps_its_result_within_its_deadline(isolations):
    isolation = isolations(block_s=0.1)
    tool = adapter(isolation)
    answer = await tool.call(ctx(), {"seconds": BLOCKS_THE_LOOP_S, "await_after": False})
    assert answer["main_thread"] is True  # it had run on the service's loop before it was caught
    assert "block_loop" in isolation.quarantined


async def test_a_tool_that_blocks_past_its_deadline_is_deadline_exceeded(isolations):
    tool = adapter(isolations(block_s=0.1))
    with pytest.raises(DeadlineExceeded):
        await tool.call(ctx(timeout_s=0.15), {"seconds": BLOCKS_THE_LOOP_S, "await_after": False})


async def test_a_tenants_isolated_calls_are_bounded_and_a_deadline_frees_a_queued_one(isolations):
    # A long threshold: the tenant's blocked loop is not refused as such, so its queue fills.
    isolation = isolations(block_s=60, isolated=("block_loop",), per_tenant=2)
    tool = adapter(isolation)
    holding = asyncio.create_task(tool.call(ctx(), {"hold": True, "label": "holding"}))
    await wait_for(blocking_tools.entered)
    queued = asyncio.create_task(tool.call(ctx(timeout_s=1.0), {"label": "queued"}))
    await until(lambda: isolation.held("acme") == 2)
    with pytest.raises(RateLimited, match="already has 2 isolated calls"):
        await tool.call(ctx(), {})  # refused at once, not queued behind its own
    with pytest.raises(DeadlineExceeded):
        await queued  # answered at its deadline while the loop is still held...
    assert isolation.held("acme") == 1  # ...and its place freed at once
    assert (await adapter(isolation, "well_behaved").call(ctx("globex"), {}))["main_thread"] is True
    later = asyncio.create_task(tool.call(ctx(), {"label": "later"}))
    await until(lambda: isolation.held("acme") == 2)
    blocking_tools.release.set()
    assert (await holding)["tenant"] == "acme"
    assert (await later)["thread"] == "corral-isolated-acme"
    assert blocking_tools.started == ["holding", "later"]  # the call past its deadline never started


async def test_when_every_isolation_loop_is_taken_a_new_tenant_waits_for_one_to_be_idle(isolations):
    isolation = isolations(block_s=60, isolated=("block_loop",), loops=1)
    tool = adapter(isolation)
    holding = asyncio.create_task(tool.call(ctx("acme"), {"hold": True}))
    await wait_for(blocking_tools.entered)
    with pytest.raises(Unavailable, match="all 1 isolation loops are busy"):
        await tool.call(ctx("globex"), {})
    blocking_tools.release.set()
    await holding
    await until(lambda: isolation.held("acme") == 0)
    assert (await tool.call(ctx("globex"), {}))["thread"] == "corral-isolated-globex"  # acme's idle loop went


async def test_the_watchdog_names_the_tool_and_tenant_while_they_block_the_loop(isolations):
    isolation = isolations(block_s=0.1)
    reports: list[dict] = []

    def report(**fields) -> None:  # from the watchdog's thread, while the loop is blocked
        reports.append(fields)
        blocking_tools.release.set()  # which is what lets the blocking tool go on

    watchdog = LoopWatchdog(isolation, report=report)
    await watchdog.start()
    try:
        with pytest.raises(Unavailable):
            await adapter(isolation).call(ctx(), {"hold": True})  # holds this loop until reported
    finally:
        await watchdog.stop()
    [reported] = reports
    assert reported["tool"] == "block_loop" and reported["tenant_id"] == "acme"
    assert reported["blocked_ms"] >= 100


async def test_the_watchdog_says_where_the_loop_is_stuck_outside_any_tool(isolations):
    reports: list[dict] = []

    def report(**fields) -> None:
        reports.append(fields)
        blocking_tools.release.set()

    watchdog = LoopWatchdog(isolations(block_s=0.1), report=report)
    await watchdog.start()
    try:
        blocking_tools.release.wait(30)  # this very test blocks its loop, until reported
    finally:
        await watchdog.stop()
    [reported] = reports
    assert "tool" not in reported and reported["blocked_ms"] >= 100
    assert "in test_the_watchdog_says_where_the_loop_is_stuck_outside_any_tool" in reported["where"]
