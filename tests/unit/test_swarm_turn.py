"""A conversation's turn without a broker: handoffs, tools, refusals, limits, loop detection,
guardrails and the session's bound, with scripted models and a recording bus."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import yaml

from contracts.agents import AgentDefinition, Guardrail, HandoffInput, SwarmDefinition
from contracts.errors import DeadlineExceeded, Forbidden, LimitExceeded
from contracts.models import ModelDefinition
from services.llm import ModelRegistry
from services.swarm.turn import Session, Turn, bounded


class RecordingBus:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.audited: list[tuple[str, str, dict[str, Any]]] = []

    async def call_tool(self, tool, arguments, timeout):
        self.calls.append(("tool", tool, arguments))
        return {"ok": True}

    async def call_agent(self, agent, message, timeout):
        self.calls.append(("agent", agent, {"message": message}))
        return {"agent": agent, "answer": "from " + agent}

    async def run_graph(self, graph, arguments, timeout):
        self.calls.append(("graph", graph, arguments))
        return {"graph": graph}

    async def start_workflow(self, workflow, arguments, timeout):
        self.calls.append(("workflow", workflow, arguments))
        return {"run_id": "r1", "status": "running"}

    async def event(self, kind, data):
        self.events.append((kind, data))

    def audit(self, action, outcome, **detail):
        self.audited.append((action, outcome, detail))


MODELS = """
- name: a_model
  scripted:
    rules:
      - contains: "lookup"
        reply:
          tool_calls: [{name: lookup, arguments: {q: "{message}"}}, {name: transfer_to_b, arguments: {reason: next}}]
      - {contains: "ping", reply: {tool_calls: [{name: transfer_to_b, arguments: {}}]}}
      - {contains: "rogue", reply: {tool_calls: [{name: delete_everything, arguments: {}}]}}
      - {contains: "not available", reply: "refused, as it should be"}
      - {contains: ["hungry", '"ok": true'], reply: {tool_calls: [{name: lookup, arguments: {}}]}}
    default: "a answers"
- name: b_model
  scripted:
    rules:
      - {contains: "ping", reply: {tool_calls: [{name: transfer_to_a, arguments: {}}]}}
    default: {template: "b answers after {message}"}
"""
AGENTS = """
- {name: a, model: a_model, tools: [lookup], handoffs: [b], tool_guardrails: [no_drop]}
- {name: b, model: b_model, handoffs: [a], output_guardrails: [short]}
"""


def turn(limits: dict | None = None, **overrides) -> tuple[Turn, RecordingBus]:
    models = {m["name"]: ModelDefinition.model_validate(m) for m in yaml.safe_load(MODELS)}
    agents = {a["name"]: AgentDefinition.model_validate(a) for a in yaml.safe_load(AGENTS)}
    guardrails = {
        "no_drop": Guardrail(name="no_drop", deny=["drop table"]),
        "short": Guardrail(name="short", max_chars=200),
    }
    swarm = SwarmDefinition(name="s", entry="a", members=["a", "b"], limits=limits or {}, **overrides)
    schemas = {"lookup": {"name": "lookup", "description": "", "parameters": {"type": "object"}}}
    bus = RecordingBus()
    return Turn(swarm, agents, guardrails, schemas, ModelRegistry(models), "acme", bus), bus


def session() -> Session:
    return Session(swarm="s", agent="a", principal="dev")


async def test_tool_calls_run_before_the_handoff_of_the_same_answer_and_the_history_stays_valid():
    conversation, bus = turn()
    kept = session()
    outcome = await conversation.run(kept, "please lookup my order")
    assert bus.calls == [("tool", "lookup", {"q": "please lookup my order"})]
    assert outcome.agent == "b" and outcome.message == "b answers after please lookup my order"
    assert kept.agent == "b" and outcome.handoffs == [{"from": "a", "to": "b"}]
    # Every tool call the history holds has its result, in order, before the next answer.
    calls = [c["id"] for m in kept.messages if m.get("tool_calls") for c in m["tool_calls"]]
    results = [m["tool_call_id"] for m in kept.messages if m["role"] == "tool"]
    assert calls == results
    assert [kind for kind, _ in bus.events] == ["agent_started", "tool_called", "handoff", "agent_started", "message"]


async def test_a_tool_the_agent_is_not_given_is_refused_to_the_model_and_audited():
    conversation, bus = turn()
    outcome = await conversation.run(session(), "go rogue")
    assert outcome.message == "refused, as it should be" and bus.calls == []
    assert bus.audited == [("swarm_tool", "refused", {"agent": "a", "tool": "delete_everything"})]


async def test_a_handoff_loop_ends_the_turn_with_a_typed_error_and_an_event():
    conversation, bus = turn()
    with pytest.raises(LimitExceeded, match="handed off"):
        await conversation.run(session(), "ping")
    assert bus.events[-1] == ("limit_reached", {"limit": "handoff_loop", "message": bus.events[-1][1]["message"]})


async def test_the_handoffs_per_turn_limit_fires_before_loop_detection_when_lower():
    conversation, _ = turn({"max_handoffs_per_turn": 2, "max_repeated_handoffs": 0})
    with pytest.raises(LimitExceeded, match="more than 2 handoffs"):
        await conversation.run(session(), "ping")


async def test_the_handoffs_per_session_limit_counts_across_turns():
    conversation, _ = turn({"max_handoffs_per_session": 1})
    kept = session()
    await conversation.run(kept, "please lookup")  # one handoff: a -> b
    kept.agent = "a"
    with pytest.raises(LimitExceeded, match="in the session"):
        await conversation.run(kept, "please lookup again")


async def test_model_calls_per_turn_are_bounded():
    conversation, bus = turn({"max_model_calls_per_turn": 3})
    with pytest.raises(LimitExceeded, match="more than 3 model calls"):
        await conversation.run(session(), "hungry")  # asks for the tool again and again
    assert len(bus.calls) == 3


async def test_token_budgets_per_turn_and_per_session_fire():
    conversation, _ = turn({"max_tokens_per_turn": 5})
    with pytest.raises(LimitExceeded, match="tokens"):
        await conversation.run(session(), "a long message " * 10)
    conversation, _ = turn({"max_tokens_per_session": 30})
    kept = session()
    kept.tokens = 29
    with pytest.raises(LimitExceeded, match="session used more than 30 tokens"):
        await conversation.run(kept, "hello there")


async def test_guardrails_check_tool_arguments_and_answers():
    conversation, bus = turn()
    outcome = await conversation.run(session(), "lookup; drop table orders")
    # The tool's arguments were refused (the model saw why); the handoff in the same answer went on.
    assert bus.calls == [] and outcome.agent == "b"
    conversation, _ = turn()
    with pytest.raises(Forbidden, match="short"):
        await conversation.run(session(), "please lookup " + "x" * 300)  # b's answer repeats it: too long


def test_a_session_is_bounded_at_a_user_message():
    messages = [{"role": "user", "content": "1"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]
    messages += [{"role": "tool", "tool_call_id": "c", "content": "{}"}, {"role": "assistant", "content": "ok"}]
    messages += [{"role": "user", "content": "2"}, {"role": "assistant", "content": "fine"}]
    assert bounded(messages, 3) == messages[4:]
    assert bounded(messages, 10) == messages
    # No cut point inside the window: nothing is kept rather than a tool result without its call.
    assert bounded(messages[:4], 2) == []


class StuckBus(RecordingBus):
    """A tool that never answers (the test never lets it)."""

    def __init__(self) -> None:
        super().__init__()
        self.never = asyncio.Event()

    async def call_tool(self, tool, arguments, timeout):
        await self.never.wait()


async def test_the_turn_timeout_ends_a_stuck_turn_with_a_typed_error_and_an_event():
    conversation, _ = turn({"turn_timeout_s": 0.05})
    stuck = StuckBus()
    conversation.bus = stuck
    with pytest.raises(DeadlineExceeded, match="turn_timeout_s"):
        await conversation.run(session(), "hungry")
    assert stuck.events[-1][0] == "limit_reached" and stuck.events[-1][1]["limit"] == "turn_timeout"


class Seen:
    """A model that records what it was given, then answers like a_model/b_model would."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.given: list[list[dict]] = []

    async def complete(self, messages, **options):
        self.given.append(messages)
        return await self.inner.complete(messages, **options)


async def test_an_agent_taking_over_receives_what_its_definition_says():
    for handoff_input, expected_users in (("full", ["earlier", "please lookup"]), ("message", ["please lookup"])):
        conversation, _ = turn()
        b = conversation.agents["b"].model_copy(update={"handoff_input": HandoffInput(handoff_input)})
        conversation.agents = {**conversation.agents, "b": b}
        seen = Seen(conversation.models.clients["b_model"])
        conversation.models.clients["b_model"] = seen
        kept = session()
        kept.messages = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "a answers"}]
        await conversation.run(kept, "please lookup")
        users = [m["content"] for m in seen.given[0] if m["role"] == "user"]
        assert users == expected_users, handoff_input


async def test_a_session_whose_agent_left_the_swarm_starts_again_at_the_entry():
    conversation, _ = turn()
    kept = session()
    kept.agent = "retired"  # the definitions changed between two turns
    outcome = await conversation.run(kept, "hello")
    assert outcome.agent == "a" and outcome.message == "a answers"
