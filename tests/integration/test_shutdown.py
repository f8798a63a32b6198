"""Graceful shutdown: a stopping service takes no new messages but finishes those in flight."""

from __future__ import annotations

import asyncio

import yaml

from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from tests.support import slow_tool
from tests.support.services import running_services

DEFINITIONS = {
    "tools": [{"name": "slow", "python": {"callable": "tests.support.slow_tool:wait_for_release"}}],
    "graphs": [{"name": "hold", "entry": "call", "nodes": {"call": {"kind": "tool", "tool": "slow", "timeout_s": 30}}}],
    "tenants": [{"tenant": "acme", "default_route": "hold", "routes": {"hold": {"graph": "hold"}}, "tools": ["slow"]}],
}


async def test_a_stopping_tools_service_finishes_the_call_in_flight(secured, tmp_path):
    (tmp_path / "defs.yaml").write_text(yaml.safe_dump(DEFINITIONS))
    slow_tool.reset()
    async with running_services(
        secured.url, secured.state_dir, ("auth", "router", "graph", "tools"), definitions=tmp_path / "defs.yaml"
    ) as services:
        client = await CorralClient.connect(
            secured.url, tenant="acme", token=mint_dev_token("acme", key=secured.secrets.dev_key)
        )
        try:
            request = asyncio.create_task(client.request("hold on", timeout=20))
            await asyncio.wait_for(slow_tool.started.wait(), 10)
            stopping = asyncio.create_task(services["tools"].stop())
            await asyncio.sleep(0)  # let stop() unsubscribe before the tool is released
            assert not stopping.done()  # it waits for the call in flight
            slow_tool.release.set()
            result = await asyncio.wait_for(request, 20)
            await asyncio.wait_for(stopping, 20)
        finally:
            await client.close()
    assert result.output == {"tenant": "acme", "released": True}


async def test_a_run_given_up_by_a_stopping_replica_is_answered_unavailable_with_a_failed_event(secured, tmp_path):
    """Past the drain timeout a stopping replica cancels what it still holds: the client hears so
    at once, typed and retryable, instead of waiting out its deadline."""
    from contracts.envelope import EventType
    from contracts.errors import Unavailable

    (tmp_path / "defs.yaml").write_text(yaml.safe_dump(DEFINITIONS))
    slow_tool.reset()
    async with running_services(
        secured.url,
        secured.state_dir,
        ("auth", "router", "graph", "tools"),
        definitions=tmp_path / "defs.yaml",
        drain_timeout_s=0.2,
    ) as services:
        client = await CorralClient.connect(
            secured.url, tenant="acme", token=mint_dev_token("acme", key=secured.secrets.dev_key)
        )
        events = []
        try:
            request = asyncio.create_task(client.request("hold on", timeout=60, on_event=events.append))
            await asyncio.wait_for(slow_tool.started.wait(), 10)
            await services["graph"].stop()  # holds the run (waiting on the tool) past its drain timeout
            try:
                await asyncio.wait_for(request, 10)
            except Unavailable as error:
                refused = error
            else:
                raise AssertionError("the run was answered as if it had finished")
        finally:
            slow_tool.release.set()
            await client.close()
    assert refused.retryable and "stopped before it finished" in refused.message
    failed = [event for event in events if event.type is EventType.FAILED]
    assert [event.data["code"] for event in failed] == ["unavailable"]


async def test_a_request_with_an_idempotency_key_is_sent_again_when_its_replica_gives_it_up(secured, tmp_path):
    (tmp_path / "defs.yaml").write_text(yaml.safe_dump(DEFINITIONS))
    slow_tool.reset()
    names = ("auth", "router", "graph", "tools")
    async with running_services(
        secured.url, secured.state_dir, names, definitions=tmp_path / "defs.yaml", drain_timeout_s=0.2
    ) as services:
        client = await CorralClient.connect(
            secured.url, tenant="acme", token=mint_dev_token("acme", key=secured.secrets.dev_key)
        )
        try:
            request = asyncio.create_task(client.request("hold on", timeout=60, idempotency_key="order-42"))
            await asyncio.wait_for(slow_tool.started.wait(), 10)
            slow_tool.started.clear()
            async with running_services(secured.url, secured.state_dir, ("graph",), definitions=tmp_path / "defs.yaml"):
                await services["graph"].stop()  # gives the run up: the client sends it again
                await asyncio.wait_for(slow_tool.started.wait(), 10)  # ... to the other replica
                slow_tool.release.set()
                result = await asyncio.wait_for(request, 20)
        finally:
            slow_tool.release.set()
            await client.close()
    assert result.output == {"tenant": "acme", "released": True}
