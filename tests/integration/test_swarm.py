"""Conversations over a real broker configured as in production: handoffs, tools, sessions kept
per tenant and user, limits that fire, and the boundaries a model cannot steer out of."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from nats.js.errors import KeyNotFoundError

from contracts.errors import Conflict, Forbidden, LimitExceeded, NotFound
from tests.support import swarm_tools
from tests.support.swarm_tools import client_for, swarm_system


@pytest.fixture
async def system(secured):
    async with swarm_system(secured) as services:
        yield secured, services


def kinds(result):
    return [(event.type.value, event.data.get("agent") or event.data.get("to")) for event in result.events]


async def test_a_conversation_hands_off_calls_a_tool_and_keeps_its_session(system):
    broker, _ = system
    acme = await client_for(broker)
    try:
        first = await acme.request("Where is my order?", target="support")
        assert first.output["agent"] == "orders" and first.output["message"] == "Your order has shipped."
        assert first.output["handoffs"] == [{"from": "triage", "to": "orders"}]
        session = first.output["session"]
        assert ("handoff", "orders") in kinds(first) and ("tool_called", "orders") in kinds(first)
        # The next turn starts with the agent the conversation was handed to.
        second = await acme.request("and my order again?", target="support", session=session)
        assert second.output["agent"] == "orders" and second.output["handoffs"] == []
        assert second.output["session"] == session
    finally:
        await acme.close()
    # The tool ran for the tenant of the subject (the runtime's), twice.
    assert [call["tenant"] for call in swarm_tools.CALLS["order_status"]] == ["acme", "acme"]


async def test_tool_calls_and_a_handoff_in_one_answer_run_the_tools_first(system):
    broker, _ = system
    acme = await client_for(broker)
    try:
        first = await acme.request("my order", target="support")
        answer = await acme.request("and my balance", target="support", session=first.output["session"])
    finally:
        await acme.close()
    # orders answered with a tool call and a handoff together: the lookup ran, then billing took over.
    assert swarm_tools.CALLS["order_status"][-1]["order_id"] == "A-7"
    assert answer.output["handoffs"] == [{"from": "orders", "to": "billing"}]
    assert answer.output["message"] == "Your balance is 42." and answer.output["agent"] == "billing"


async def test_several_handoffs_in_one_answer_are_refused_and_the_agent_answers_again(system):
    broker, _ = system
    acme = await client_for(broker)
    try:
        result = await acme.request("both please", target="support")
    finally:
        await acme.close()
    assert result.output["agent"] == "triage" and result.output["handoffs"] == []
    assert result.output["message"] == "Please ask about orders or billing, one at a time."


async def test_an_faq_is_answered_by_the_entry_agent_directly(system):
    broker, _ = system
    acme = await client_for(broker)
    try:
        result = await acme.request("What are your hours?", target="support")
    finally:
        await acme.close()
    assert result.output["agent"] == "triage" and result.output["message"] == "We are open from 9 to 5."
    assert result.output["model_calls"] == 1 and result.output["tool_calls"] == 0


async def test_a_handoff_loop_is_cut_by_the_default_limit(system):
    broker, _ = system
    acme = await client_for(broker)
    try:
        with pytest.raises(LimitExceeded, match="handed off"):
            await acme.request("loop forever", target="support")
    finally:
        await acme.close()


async def test_two_turns_of_one_session_at_once_are_serialised(system):
    broker, _ = system
    acme = await client_for(broker)
    try:
        first = await acme.request("hours?", target="support")
        session = first.output["session"]
        held = asyncio.create_task(acme.request("hold on", target="support", session=session))
        await asyncio.wait_for(swarm_tools.ENTERED.wait(), 10)  # the first turn is inside its tool call
        with pytest.raises(Conflict, match="in progress"):
            await acme.request("hours again?", target="support", session=session)
        swarm_tools.RELEASE.set()
        finished = await held
        after = await acme.request("hours, once more", target="support", session=session)
    finally:
        swarm_tools.RELEASE.set()
        await acme.close()
    assert finished.output["message"] == "Held, and let go."
    assert after.output["session"] == session and after.output["message"] == "We are open from 9 to 5."


async def test_a_guardrail_refuses_the_message_and_the_session_keeps_nothing_of_it(system):
    broker, services = system
    acme = await client_for(broker)
    try:
        first = await acme.request("hours?", target="support")
        session = first.output["session"]
        with pytest.raises(Forbidden, match="no_card_numbers"):
            await acme.request("my card is 4111111111111111", target="support", session=session)
        sessions = await services["swarm"].nc.jetstream().key_value("SWARM_SESSIONS")
        kept = json.loads((await sessions.get(f"acme.{session}")).value)
    finally:
        await acme.close()
    assert [m["content"] for m in kept["messages"] if m["role"] == "user"] == ["hours?"]
    assert kept.get("busy") is None  # the refused turn let the session go


async def test_an_orchestrator_calls_an_agent_and_a_graph_as_tools_and_their_events_nest(system):
    broker, _ = system
    acme = await client_for(broker)
    try:
        asked = await acme.request("ask orders about it", target="concierge")
        greeted = await acme.request("greet someone", target="concierge")
    finally:
        await acme.close()
    assert asked.output["agent"] == "concierge" and asked.output["message"] == "Orders says: Your order has shipped."
    # The agent called as a tool spoke in the caller's run: its events are in the same stream.
    assert ("agent_started", "orders") in kinds(asked) and ("tool_called", "orders") in kinds(asked)
    assert swarm_tools.CALLS["order_status"] == [{"tenant": "acme", "order_id": "A-1001"}]
    assert greeted.output["message"] == "The graph said: Hello Ada!"


async def test_an_agent_only_callable_as_a_tool_cannot_be_talked_to_directly(system):
    broker, _ = system
    # globex's routes name only the support swarm: the concierge is not its, as a route or a tool.
    globex = await client_for(broker, tenant="globex")
    try:
        with pytest.raises(NotFound):
            await globex.request("ask orders about it", target="concierge")
    finally:
        await globex.close()


async def test_an_idle_session_is_forgotten_and_its_id_starts_afresh(secured, monkeypatch):
    monkeypatch.setenv("CORRAL_SWARM_SESSION_IDLE_S", "1")
    async with swarm_system(secured) as services:
        acme = await client_for(secured)
        try:
            first = await acme.request("Where is my order?", target="support")
            session = first.output["session"]
            sessions = await services["swarm"].nc.jetstream().key_value("SWARM_SESSIONS")
            deadline = time.monotonic() + 30
            while True:  # the bucket's age limit removes it (polled: the broker's clock decides)
                try:
                    await sessions.get(f"acme.{session}")
                except KeyNotFoundError:
                    break
                assert time.monotonic() < deadline, "the idle session was never forgotten"
                await asyncio.sleep(0.2)
            again = await acme.request("and my order?", target="support", session=session)
        finally:
            await acme.close()
    # Forgotten: the same id is a new conversation, which starts at the entry agent.
    assert first.output["agent"] == "orders" and again.output["handoffs"] == [{"from": "triage", "to": "orders"}]
