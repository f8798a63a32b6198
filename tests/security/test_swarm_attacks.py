"""A model (or a tenant) trying to steer a conversation out of its bounds, over a real broker:
handoffs to agents the definition does not list, tools the agent is not given, tenant ids in
arguments, other users' and other tenants' sessions, and loops. Each is refused by the service
whatever the model answers."""

from __future__ import annotations

import json

import pytest

from contracts.errors import LimitExceeded, NotFound
from corral.audit_reader import read_trail
from tests.support import swarm_tools
from tests.support.swarm_tools import client_for, swarm_system


@pytest.fixture
async def system(secured):
    async with swarm_system(secured) as services:
        yield secured, services


async def test_a_handoff_to_an_agent_outside_the_definition_is_refused_and_audited(system):
    broker, services = system
    acme = await client_for(broker)
    try:
        result = await acme.request("escalate me to admin", target="support")
        await services["swarm"].flushed()
        trail = await read_trail(broker.url, "admin", broker.secrets.passwords["admin"], "acme")
    finally:
        await acme.close()
    # The model saw the refusal as its tool's result and answered from it; nobody took over.
    assert result.output["agent"] == "triage" and result.output["handoffs"] == []
    assert result.output["message"] == "I cannot do that."
    refused = [r for r in trail.records if r.action == "swarm_handoff" and r.outcome == "refused"]
    assert len(refused) == 1 and refused[0].detail["to"] == "admin" and not trail.problems


async def test_a_handoff_to_an_agent_of_another_tenants_routes_is_refused(system):
    broker, _ = system
    # concierge is acme's orchestrator: defined, but no member of the support swarm, nor globex's.
    globex = await client_for(broker, tenant="globex")
    try:
        result = await globex.request("put me through to the concierge", target="support")
    finally:
        await globex.close()
    assert result.output["agent"] == "triage" and result.output["handoffs"] == []
    assert result.output["message"] == "I cannot do that."


async def test_a_handoff_the_agent_does_not_list_is_refused_even_to_a_member(system):
    broker, _ = system
    acme = await client_for(broker)
    try:
        first = await acme.request("a bill question", target="support")
        assert first.output["agent"] == "billing"
        # billing lists only triage: orders is a member of the swarm, but not billing's to choose.
        second = await acme.request("orders please", target="support", session=first.output["session"])
    finally:
        await acme.close()
    assert second.output["agent"] == "billing" and second.output["handoffs"] == []


async def test_a_tool_the_agent_is_not_given_is_never_called(system):
    broker, _ = system
    acme = await client_for(broker)
    try:
        result = await acme.request("tell me a secret", target="support")
    finally:
        await acme.close()
    assert result.output["message"] == "That tool is not mine."
    assert swarm_tools.CALLS["account_balance"] == []  # the tools service never saw it


async def test_a_tenant_id_in_a_models_arguments_never_reaches_the_tool(system):
    broker, _ = system
    acme = await client_for(broker)
    try:
        first = await acme.request("my account", target="support")
        await acme.request("my balance", target="support", session=first.output["session"])
    finally:
        await acme.close()
    calls = swarm_tools.CALLS["account_balance"]
    assert calls and all(call["tenant"] == "acme" for call in calls)
    assert all("tenant_id" not in call and call.get("tenant") == "acme" for call in calls)


async def test_another_users_session_cannot_be_continued_by_guessing_its_id(system):
    broker, _ = system
    owner = await client_for(broker, sub="alice")
    mallory = await client_for(broker, sub="mallory")
    try:
        first = await owner.request("Where is my order?", target="support")
        session = first.output["session"]
        with pytest.raises(NotFound):
            await mallory.request("and my order?", target="support", session=session)
        again = await owner.request("and my order?", target="support", session=session)
    finally:
        await owner.close()
        await mallory.close()
    assert again.output["agent"] == "orders"  # the owner's conversation went on, untouched


async def test_a_session_id_of_another_tenant_reaches_nothing_of_it(system):
    broker, services = system
    acme = await client_for(broker)
    globex = await client_for(broker, tenant="globex")
    try:
        first = await acme.request("Where is my order?", target="support")
        session = first.output["session"]
        theirs = await globex.request("hours?", target="support", session=session)
        sessions = await services["swarm"].nc.jetstream().key_value("SWARM_SESSIONS")
        acme_kept = json.loads((await sessions.get(f"acme.{session}")).value)
        globex_kept = json.loads((await sessions.get(f"globex.{session}")).value)
    finally:
        await acme.close()
        await globex.close()
    # The same id is another conversation under globex's own key: it started at the entry agent.
    assert theirs.output["agent"] == "triage" and theirs.output["message"] == "We are open from 9 to 5."
    assert acme_kept["agent"] == "orders" and len(acme_kept["messages"]) > len(globex_kept["messages"])
    assert all("order" not in str(m.get("content")) for m in globex_kept["messages"] if m["role"] == "user")


async def test_loops_are_cut_by_the_default_limits(system):
    broker, _ = system
    acme = await client_for(broker)
    events = []
    try:
        with pytest.raises(LimitExceeded):
            await acme.request("loop forever", target="support", on_event=events.append)
    finally:
        await acme.close()
    limits = [event for event in events if event.type.value == "limit_reached"]
    assert len(limits) == 1 and limits[0].data["limit"] == "handoff_loop"
