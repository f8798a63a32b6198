"""The demo's support conversation (corral/demo/definitions/support.yaml), as the README walks
through it: the FAQ answered by triage, an order question handed to the orders agent, a refund
handed to billing, which starts the refund workflow as a tool, for acme and globex apart."""

from __future__ import annotations

import pytest

from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from tests.support.services import running_services


@pytest.fixture
async def broker(secured):
    async with running_services(secured.url, secured.state_dir, ("auth", "router", "tools", "workflow", "swarm")):
        yield secured


async def test_the_three_turn_support_conversation_of_the_readme(broker):
    acme = await CorralClient.connect(
        broker.url, tenant="acme", token=mint_dev_token("acme", key=broker.secrets.dev_key)
    )
    try:
        hours = await acme.request("What are your opening hours?", target="support")
        session = hours.output["session"]
        order = await acme.request("Where is my order A-1002?", target="support", session=session)
        refund = await acme.request("I want a refund for A-1002", target="support", session=session)
        run_id = refund.output["message"].split()[4].rstrip(";")
        started = await acme.show(run_id)
    finally:
        await acme.close()
    assert hours.output["agent"] == "support_triage" and "Monday to Friday" in hours.output["message"]
    assert order.output["agent"] == "support_orders"
    assert order.output["message"] == "Order A-1002 (Giant magnet) is delayed at the depot, expected 2026-11-30."
    assert refund.output["agent"] == "support_billing"
    assert refund.output["handoffs"] == [{"from": "support_orders", "to": "support_billing"}]
    # The refund workflow runs for acme, with the order the conversation named.
    assert started["run"]["workflow"] == "refund" and started["events"][0]["input"]["order_id"] == "A-1002"


async def test_globex_gets_its_own_orders_from_the_same_conversation(broker):
    globex = await CorralClient.connect(
        broker.url, tenant="globex", token=mint_dev_token("globex", key=broker.secrets.dev_key)
    )
    try:
        theirs = await globex.request("Where is my order A-1002?", target="support")
    finally:
        await globex.close()
    # A-1002 is acme's: globex's lookup (its tenant from the subject) does not find it.
    assert theirs.output["message"] == "I could not find that order for your account."
