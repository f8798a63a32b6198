"""One turn of a conversation: the active agent's model speaks, its tool calls run, a handoff
passes the conversation to another agent, until an agent answers. No NATS here: the service
hands a :class:`Bus` in (tool calls, agents, graphs and workflows over the bus, events).

What a model may do is what the definition lists, whatever it answers:
- a tool call names one of the agent's tools (or an agent, graph or workflow it may call as a
  tool); anything else gets a ``forbidden`` result the model sees, and is audited;
- a handoff (``transfer_to_<agent>``) names one of the agent's ``handoffs`` that is a member of
  the swarm; anything else is refused the same way;
- tool calls and a handoff in one answer: the tool calls run and their results stay in the
  history, then the handoff happens (every tool call always gets its result, so the history
  stays valid for the next model call);
- several handoffs in one answer are refused (each gets a refusal as its result) and the same
  agent answers again: the swarm's ``parallel_handoffs: refuse``.

Limits (:class:`~contracts.agents.SwarmLimits`) end the turn with ``limit_exceeded`` and a
``limit_reached`` event: handoffs per turn and per session, model calls per turn, tokens per turn
and per session, a handoff repeated (A to B to A to B: loop detection), and the turn's timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from contracts.agents import HANDED_OFF, HANDOFF_PREFIX, AgentDefinition, Guardrail, HandoffInput, SwarmDefinition
from contracts.errors import CorralError, DeadlineExceeded, ErrorCode, Forbidden, LimitExceeded
from services.llm import Completion, ModelRegistry, assistant_message


class Bus(Protocol):
    """What a turn reaches outside the service: every call is under the turn's tenant."""

    async def call_tool(self, tool: str, arguments: dict[str, Any], timeout: float) -> Any: ...
    async def call_agent(self, agent: str, message: str, timeout: float) -> Any: ...
    async def run_graph(self, graph: str, arguments: dict[str, Any], timeout: float) -> Any: ...
    async def start_workflow(self, workflow: str, arguments: dict[str, Any], timeout: float) -> Any: ...
    async def event(self, kind: str, data: dict[str, Any]) -> None: ...
    def audit(self, action: str, outcome: str, **detail: Any) -> None: ...


class GuardrailTripped(Forbidden):
    """A guardrail refused a message, an answer or a tool call's arguments."""


@dataclass
class Session:
    """What is kept of a conversation between turns (services/swarm/sessions.py stores it)."""

    swarm: str
    agent: str  # the active agent: who speaks first next turn
    messages: list[dict[str, Any]] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)
    handoffs: int = 0
    tokens: int = 0
    turns: int = 0
    principal: str | None = None


@dataclass
class TurnOutcome:
    agent: str
    message: str
    handoffs: list[dict[str, str]]
    tool_calls: int
    model_calls: int
    tokens: int


@dataclass
class _Counts:
    model_calls: int = 0
    tokens: int = 0
    tool_calls: int = 0
    handoffs: list[dict[str, str]] = field(default_factory=list)


class Turn:
    """One turn of ``swarm`` on ``session`` (changed in place: the caller saves it)."""

    def __init__(
        self,
        swarm: SwarmDefinition,
        agents: dict[str, AgentDefinition],
        guardrails: dict[str, Guardrail],
        tool_schemas: dict[str, dict[str, Any]],
        models: ModelRegistry,
        tenant: str,
        bus: Bus,
    ) -> None:
        self.swarm = swarm
        self.agents = agents
        self.guardrails = guardrails
        self.tool_schemas = tool_schemas
        self.models = models
        self.tenant = tenant
        self.bus = bus
        self.limits = swarm.limits

    async def run(self, session: Session, message: str) -> TurnOutcome:
        limits = self.limits
        try:
            async with asyncio.timeout(limits.turn_timeout_s):
                return await self._run(session, message, time.monotonic() + limits.turn_timeout_s)
        except TimeoutError:
            message = f"the turn took longer than {limits.turn_timeout_s:g} s"
            await self.bus.event("limit_reached", {"limit": "turn_timeout", "message": message})
            raise DeadlineExceeded(
                f"the turn took longer than its turn_timeout_s ({limits.turn_timeout_s:g} s)"
            ) from None

    async def _run(self, session: Session, message: str, deadline: float) -> TurnOutcome:
        counts = _Counts()
        if session.agent not in self.swarm.members:  # the definitions changed since: start over at the entry
            session.agent = self.swarm.entry
        agent = self.agents[session.agent]
        start = len(session.messages)
        session.messages.append({"role": "user", "content": message})
        self._check(agent.input_guardrails, message, f"agent {agent.name!r}'s input")
        await self.bus.event("agent_started", {"agent": agent.name})
        while True:
            completion = await self._ask(agent, session, start, counts, deadline)
            if not completion.tool_calls:
                answer = completion.content
                self._check(agent.output_guardrails, answer, f"agent {agent.name!r}'s answer")
                session.messages.append({"role": "assistant", "content": answer, "agent": agent.name})
                await self.bus.event("message", {"agent": agent.name, "text": answer[:2000]})
                session.turns += 1
                return TurnOutcome(
                    agent.name, answer, counts.handoffs, counts.tool_calls, counts.model_calls, counts.tokens
                )
            session.messages.append(_assistant(agent.name, completion))
            handoffs = [call for call in completion.tool_calls if call.name.startswith(HANDOFF_PREFIX)]
            tools = [call for call in completion.tool_calls if not call.name.startswith(HANDOFF_PREFIX)]
            results = await asyncio.gather(
                *(self._tool(agent, call.name, call.arguments, deadline, counts) for call in tools)
            )
            for call, result in zip(tools, results, strict=True):
                session.messages.append(_result(call.id, result))
            if len(handoffs) > 1:  # parallel_handoffs: refuse; the same agent answers again
                refusal = {"error": ErrorCode.FORBIDDEN.value, "message": "one handoff per answer: choose one agent"}
                for call in handoffs:
                    session.messages.append(_result(call.id, refusal))
                self.bus.audit("swarm_handoff", "refused", agent=agent.name, reason="several handoffs in one answer")
                continue
            if handoffs:
                agent = await self._handoff(agent, handoffs[0], session, counts, message)

    async def _ask(
        self, agent: AgentDefinition, session: Session, start: int, counts: _Counts, deadline: float
    ) -> Completion:
        limits = self.limits
        if counts.model_calls >= limits.max_model_calls_per_turn:
            await self._limit("model_calls", f"more than {limits.max_model_calls_per_turn} model calls in one turn")
        counts.model_calls += 1
        messages = self._view(agent, session, start)
        timeout = max(0.001, min(limits.model_call_timeout_s, deadline - time.monotonic()))
        completion = await self.models.get(agent.model).complete(messages, tools=self._schemas(agent), timeout=timeout)
        self.models.meter.record(self.tenant, agent.model, completion.usage)
        used = completion.usage.total_tokens
        counts.tokens += used
        session.tokens += used
        if counts.tokens > limits.max_tokens_per_turn:
            await self._limit("tokens_per_turn", f"the turn used more than {limits.max_tokens_per_turn} tokens")
        if session.tokens > limits.max_tokens_per_session:
            await self._limit(
                "tokens_per_session", f"the session used more than {limits.max_tokens_per_session} tokens"
            )
        return completion

    def _view(self, agent: AgentDefinition, session: Session, start: int) -> list[dict[str, Any]]:
        """What the agent's model is given: its instructions, then the conversation (the whole of
        it, or for ``handoff_input: message`` only this turn's part)."""
        system = [{"role": "system", "content": agent.instructions}] if agent.instructions else []
        kept = session.messages if agent.handoff_input == HandoffInput.FULL else session.messages[start:]
        return system + [_wire(m) for m in kept]

    def _schemas(self, agent: AgentDefinition) -> list[dict[str, Any]]:
        schemas = [self.tool_schemas[name] for name in (*agent.tools, *agent.agents, *agent.graphs, *agent.workflows)]
        for target in agent.handoffs:
            if target in self.swarm.members:
                described = self.agents[target].description or f"hand the conversation to {target}"
                schemas.append(
                    {
                        "name": f"{HANDOFF_PREFIX}{target}",
                        "description": described,
                        "parameters": {"type": "object", "properties": {"reason": {"type": "string"}}},
                    }
                )
        return schemas

    async def _tool(
        self, agent: AgentDefinition, name: str, arguments: dict[str, Any], deadline: float, counts: _Counts
    ) -> Any:
        """One tool call the model asked for; failures and refusals go back to it as data, typed."""
        counts.tool_calls += 1
        timeout = max(0.001, deadline - time.monotonic())
        await self.bus.event("tool_called", {"agent": agent.name, "tool": name})
        try:
            self._check(
                agent.tool_guardrails, json.dumps(arguments), f"the arguments of {agent.name}'s call of {name!r}"
            )
            if name in agent.tools:
                return await self.bus.call_tool(name, arguments, timeout)
            if name in agent.agents:
                message = arguments.get("message")
                return await self.bus.call_agent(
                    name, message if isinstance(message, str) else json.dumps(arguments), timeout
                )
            if name in agent.graphs:
                return await self.bus.run_graph(name, arguments, timeout)
            if name in agent.workflows:
                return await self.bus.start_workflow(name, arguments, timeout)
            self.bus.audit("swarm_tool", "refused", agent=agent.name, tool=name[:128])
            return {
                "error": ErrorCode.FORBIDDEN.value,
                "message": f"tool {name[:128]!r} is not available to {agent.name}",
            }
        except CorralError as error:
            return {"error": error.code.value, "message": error.message}

    async def _handoff(
        self, agent: AgentDefinition, call: Any, session: Session, counts: _Counts, message: str
    ) -> AgentDefinition:
        target = call.name[len(HANDOFF_PREFIX) :]
        limits = self.limits
        if target not in agent.handoffs or target not in self.swarm.members:
            self.bus.audit("swarm_handoff", "refused", agent=agent.name, to=target[:128])
            refusal = {
                "error": ErrorCode.FORBIDDEN.value,
                "message": f"{agent.name} cannot hand off to {target[:128]!r}",
            }
            session.messages.append(_result(call.id, refusal))
            return agent
        reason = call.arguments.get("reason")
        try:
            self._check(agent.tool_guardrails, json.dumps(call.arguments), f"{agent.name}'s handoff to {target!r}")
        except GuardrailTripped as error:
            session.messages.append(_result(call.id, {"error": error.code.value, "message": error.message}))
            return agent
        counts.handoffs.append({"from": agent.name, "to": target})
        session.handoffs += 1
        if len(counts.handoffs) > limits.max_handoffs_per_turn:
            await self._limit("handoffs_per_turn", f"more than {limits.max_handoffs_per_turn} handoffs in one turn")
        if session.handoffs > limits.max_handoffs_per_session:
            await self._limit(
                "handoffs_per_session", f"more than {limits.max_handoffs_per_session} handoffs in the session"
            )
        if limits.max_repeated_handoffs:
            repeats = counts.handoffs.count({"from": agent.name, "to": target})
            if repeats > limits.max_repeated_handoffs:
                await self._limit("handoff_loop", f"{agent.name} handed off to {target} {repeats} times in one turn")
        session.messages.append(_result(call.id, {HANDED_OFF: target}))
        session.context["last_handoff"] = {"from": agent.name, "to": target, "reason": str(reason or "")[:500]}
        await self.bus.event("handoff", {"from": agent.name, "to": target, "reason": str(reason or "")[:500]})
        self.bus.audit("swarm_handoff", "ok", agent=agent.name, to=target)
        following = self.agents[target]
        session.agent = target
        self._check(following.input_guardrails, message, f"agent {target!r}'s input")
        await self.bus.event("agent_started", {"agent": target})
        return following

    def _check(self, names: list[str], text: str, what: str) -> None:
        for name in names:
            guardrail = self.guardrails[name]
            if guardrail.refuses(text):
                self.bus.audit("swarm_guardrail", "refused", guardrail=name, what=what)
                raise GuardrailTripped(f"{what} was refused by guardrail {name!r}: {guardrail.message}")

    async def _limit(self, limit: str, message: str) -> None:
        await self.bus.event("limit_reached", {"limit": limit, "message": message})
        raise LimitExceeded(message)


def _assistant(agent: str, completion: Completion) -> dict[str, Any]:
    return {**assistant_message(completion), "agent": agent}


def _result(call_id: str, result: Any) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result, default=str)}


def _wire(message: dict[str, Any]) -> dict[str, Any]:
    """A kept message as the Chat Completions protocol has it (without Corral's ``agent`` mark)."""
    return {key: value for key, value in message.items() if key != "agent"}


def bounded(messages: list[dict[str, Any]], most: int) -> list[dict[str, Any]]:
    """The last ``most`` messages or fewer, starting at a user message, so that no tool result
    is kept without the call it answers."""
    if len(messages) <= most:
        return messages
    for index in range(len(messages) - most, len(messages)):
        if messages[index].get("role") == "user":
            return messages[index:]
    return messages[-1:] if messages and messages[-1].get("role") == "user" else []
