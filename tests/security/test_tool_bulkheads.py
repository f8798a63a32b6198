"""One tenant's stuck synchronous tools cannot take another tenant's threads
(services/toolkit/threads.py): a share per tenant, overrunning calls counted, deadlines that free
what they reserved."""

from __future__ import annotations

import threading

import pytest

from contracts.definitions import PythonTool
from contracts.errors import DeadlineExceeded, RateLimited
from services.toolkit.context import ToolContext
from services.toolkit.python_adapter import PythonAdapter
from services.toolkit.threads import ThreadBulkhead

release = threading.Event()
ran: list[str] = []


def stuck(ctx):
    """A synchronous tool that ignores its deadline until the test releases it."""
    ran.append(ctx.tenant_id)
    release.wait(30)
    return "late"


def quick(ctx):
    ran.append(ctx.tenant_id)
    return f"quick for {ctx.tenant_id}"


def adapter(function: str, threads: ThreadBulkhead) -> PythonAdapter:
    return PythonAdapter(function, PythonTool(callable=f"tests.security.test_tool_bulkheads:{function}"), threads)


def ctx(tenant: str, timeout_s: float = 0.05) -> ToolContext:
    return ToolContext(tenant_id=tenant, run_id="r", principal="p", timeout_s=timeout_s)


@pytest.fixture(autouse=True)
def fresh():
    release.clear()
    ran.clear()
    yield
    release.set()


async def test_a_tenants_overrunning_sync_calls_hold_only_its_share_and_another_tenant_is_served():
    threads = ThreadBulkhead(threads=6, per_tenant=4)  # the shape of the finding: 6 shared threads
    slow, fast = adapter("stuck", threads), adapter("quick", threads)
    try:
        for _ in range(4):
            with pytest.raises(DeadlineExceeded):
                await slow.call(ctx("acme"), {})
        assert threads.held("acme") == 4  # past their deadline, still in their threads
        with pytest.raises(RateLimited, match="already has 4 calls"):
            await slow.call(ctx("acme"), {})  # refused at once, not queued behind its own
        assert await fast.call(ctx("globex", timeout_s=10), {}) == "quick for globex"
    finally:
        release.set()
        threads.close()


async def test_a_tenant_gets_its_threads_back_when_its_overrunning_calls_return():
    threads = ThreadBulkhead(threads=2, per_tenant=1)
    slow, fast = adapter("stuck", threads), adapter("quick", threads)
    try:
        with pytest.raises(DeadlineExceeded):
            await slow.call(ctx("acme"), {})
        with pytest.raises(RateLimited):
            await fast.call(ctx("acme"), {})
        release.set()
        for _ in range(1000):  # the thread returns, and gives the share back on the loop
            if not threads.held("acme"):
                break
            await __import__("asyncio").sleep(0.01)
        assert await fast.call(ctx("acme", timeout_s=10), {}) == "quick for acme"
    finally:
        threads.close()


async def test_a_call_that_never_got_a_thread_before_its_deadline_never_runs():
    threads = ThreadBulkhead(threads=1, per_tenant=5)
    slow, fast = adapter("stuck", threads), adapter("quick", threads)
    try:
        with pytest.raises(DeadlineExceeded):
            await slow.call(ctx("acme"), {})  # holds the only thread
        with pytest.raises(DeadlineExceeded):
            await fast.call(ctx("globex"), {})  # waits for a thread past its deadline
        assert threads.held("globex") == 0  # its reservation went with its deadline
        release.set()
        assert await fast.call(ctx("globex", timeout_s=10), {}) == "quick for globex"
        assert ran == ["acme", "globex"]  # the timed-out call never ran
    finally:
        threads.close()
