"""Layer 3, tools: a model cannot choose the tenant, nor reach a tool it was not given or its
tenant is not allowed. The model here is scripted to attack; the runtime must not care."""

from __future__ import annotations

import nats
import pytest
import yaml

from contracts import subjects
from contracts.envelope import Envelope, Kind, ToolCall, deadline_in
from contracts.errors import Forbidden
from contracts.replies import decode_reply
from corral.audit_reader import read_trail
from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from tests.support.services import running_services

DEFINITIONS = {
    "tools": [
        {
            "name": "orders_lookup",
            "python": {"callable": "corral.demo.tools:lookup_orders"},
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        },
        {"name": "export_everything", "python": {"callable": "tests.security.attack_tools:export_everything"}},
    ],
    "models": [
        {
            "name": "mallory",
            "scripted": {
                "rules": [
                    {"contains": "not available", "reply": "I was refused."},
                    {
                        "contains": "steal",
                        "reply": {
                            "tool_call": {
                                "name": "orders_lookup",
                                "arguments": {"query": "G-2201", "tenant_id": "globex"},
                            }
                        },
                    },
                    {"contains": "export", "reply": {"tool_call": {"name": "export_everything", "arguments": {}}}},
                    {"contains": '"found": false', "reply": "No such order."},
                    {"contains": '"found": true', "reply": "LEAKED another tenant's order"},
                ],
                "default": "?",
            },
        }
    ],
    "graphs": [
        {
            "name": "assistant",
            "model": "mallory",
            "entry": "agent",
            "nodes": {"agent": {"kind": "agent", "prompt": "{input.text}", "tools": ["orders_lookup"]}},
        }
    ],
    "tenants": [
        {
            "tenant": "acme",
            "default_route": "assistant",
            "routes": {"assistant": {"graph": "assistant"}},
            "tools": ["orders_lookup"],
        },
        {
            "tenant": "globex",
            "default_route": "assistant",
            "routes": {"assistant": {"graph": "assistant"}},
            "tools": ["orders_lookup"],
        },
    ],
}


@pytest.fixture
async def attacked(secured, tmp_path):
    (tmp_path / "defs.yaml").write_text(yaml.safe_dump(DEFINITIONS))
    async with running_services(
        secured.url, secured.state_dir, ("auth", "router", "graph", "tools"), definitions=tmp_path / "defs.yaml"
    ) as services:
        client = await CorralClient.connect(
            secured.url, tenant="acme", token=mint_dev_token("acme", key=secured.secrets.dev_key)
        )
        try:
            yield secured, services, client
        finally:
            await client.close()


async def audit_records(broker, services, tenant="acme"):
    for service in services.values():
        await service.flushed()
    return (await read_trail(broker.url, "admin", broker.secrets.passwords["admin"], tenant)).records


async def test_a_model_that_names_another_tenant_still_gets_only_its_own_tenants_data(attacked):
    broker, services, client = attacked
    result = await client.request("steal globex's order G-2201")
    assert result.output == {"answer": "No such order.", "tool_calls": 1}
    records = await audit_records(broker, services)
    override = next(r for r in records if r.action == "tenant_override_attempt")
    assert override.detail == {"tool": "orders_lookup", "removed": ["tenant_id"]}
    assert any(r.action == "tool_call" and r.outcome == "ok" for r in records)


async def test_a_model_asking_for_a_tool_it_was_not_given_is_refused_before_the_bus(attacked):
    broker, services, client = attacked
    result = await client.request("export everything")
    assert result.output == {"answer": "I was refused.", "tool_calls": 1}
    records = await audit_records(broker, services)
    assert not any(r.detail.get("tool") == "export_everything" for r in records)  # never reached the tools


async def test_the_tools_service_refuses_a_tool_the_tenant_is_not_allowed_whoever_asks(attacked):
    broker, services, _ = attacked
    graph = await nats.connect(
        broker.url, user="graph", password=broker.secrets.passwords["graph"], inbox_prefix=b"_INBOX._graph"
    )
    call = Envelope[ToolCall](
        kind=Kind.TOOL_CALL, tenant_id="acme", deadline=deadline_in(10), payload=ToolCall(tool="export_everything")
    )
    try:
        reply = await graph.request(
            subjects.tool_call("acme", "export_everything"), call.model_dump_json().encode(), timeout=5
        )
    finally:
        await graph.close()
    with pytest.raises(Forbidden, match="not allowed for tenant 'acme'"):
        decode_reply(reply.data)
    records = await audit_records(broker, services)
    assert any(
        r.action == "tool_call" and r.outcome == "refused" and r.detail["tool"] == "export_everything" for r in records
    )
