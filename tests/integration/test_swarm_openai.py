"""A conversation whose agents speak with a real Chat Completions server (a local one started by
the test, speaking the OpenAI protocol): tools and handoffs offered as functions, tool calls and
their results sent back in the protocol's shape, over a real broker."""

from __future__ import annotations

import json
import threading

import pytest
import yaml

from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from tests.support import swarm_tools
from tests.support.http import Received, Reply, http_server
from tests.support.services import running_services


def completion(content=None, tool_calls=None):
    message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = [
            {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
            for i, (name, args) in enumerate(tool_calls)
        ]
    return {"choices": [{"message": message}], "usage": {"prompt_tokens": 10, "completion_tokens": 2}}


class ChatServer:
    """Answers as the agent whose functions the request offers would: triage hands off, orders
    looks the order up, then answers from the tool's result."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.lock = threading.Lock()

    def route(self, request: Received) -> Reply:
        body = json.loads(request.body)
        with self.lock:
            self.bodies.append(body)
        offered = {tool["function"]["name"] for tool in body.get("tools", [])}
        last = body["messages"][-1]
        if "transfer_to_orders" in offered:
            return Reply(body=completion(tool_calls=[("transfer_to_orders", {"reason": "an order"})]))
        if last["role"] == "tool" and "shipped" in last["content"]:
            return Reply(body=completion(content="Your order has shipped."))
        return Reply(body=completion(tool_calls=[("order_status", {"order_id": "A-1", "tenant_id": "globex"})]))


@pytest.fixture
def chat():
    server = ChatServer()
    with http_server(server.route) as http:
        yield server, http.url


@pytest.fixture
async def broker(secured, chat, tmp_path):
    _, url = chat
    swarm_tools.reset()
    model = {"openai": {"base_url": f"{url}/v1", "model": "local", "max_retries": 0}}
    document = {
        "tools": [
            {
                "name": "order_status",
                "python": {"callable": "tests.support.swarm_tools:order_status"},
                "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
            }
        ],
        "models": [{"name": "local", **model}],
        "agents": [
            {"name": "triage", "model": "local", "instructions": "Route the customer.", "handoffs": ["orders"]},
            {"name": "orders", "model": "local", "instructions": "Look orders up.", "tools": ["order_status"]},
        ],
        "swarms": [{"name": "support", "entry": "triage", "members": ["triage", "orders"]}],
        "tenants": [
            {
                "tenant": "acme",
                "routes": {"support": {"pattern": "swarm", "swarm": "support"}},
                "tools": ["order_status"],
            }
        ],
    }
    folder = tmp_path / "definitions"
    folder.mkdir()
    (folder / "chat.yaml").write_text(yaml.safe_dump(document))
    async with running_services(secured.url, secured.state_dir, ("auth", "router", "tools", "swarm"), folder):
        yield secured


async def test_handoffs_and_tool_calls_travel_in_the_chat_completions_protocol(broker, chat):
    server, _ = chat
    acme = await CorralClient.connect(
        broker.url, tenant="acme", token=mint_dev_token("acme", key=broker.secrets.dev_key)
    )
    try:
        result = await acme.request("Where is my order?", target="support")
    finally:
        await acme.close()
    assert result.output["agent"] == "orders" and result.output["message"] == "Your order has shipped."
    assert result.output["tokens"] == 3 * 12
    first, second, third = server.bodies
    # Triage is offered its handoff as a function; orders its tool, and no handoff it does not have.
    assert [t["function"]["name"] for t in first["tools"]] == ["transfer_to_orders"]
    assert [t["function"]["name"] for t in second["tools"]] == ["order_status"]
    assert second["messages"][0] == {"role": "system", "content": "Look orders up."}
    # The handoff is in the history as the protocol has it: the call, then its result.
    call, answer = second["messages"][-2:]
    assert call["role"] == "assistant" and call["tool_calls"][0]["function"]["name"] == "transfer_to_orders"
    assert answer == {
        "role": "tool",
        "tool_call_id": call["tool_calls"][0]["id"],
        "content": '{"handed_off_to": "orders"}',
    }
    assert third["messages"][-1]["role"] == "tool" and "shipped" in third["messages"][-1]["content"]
    assert all("agent" not in message for body in server.bodies for message in body["messages"])
    # The model named another tenant: the tool ran for acme, the subject's tenant.
    assert swarm_tools.CALLS["order_status"] == [{"tenant": "acme", "order_id": "A-1"}]
