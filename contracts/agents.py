"""Agents and swarms as data: who may speak, with which model, tools and handoffs, within which
limits. Validated at load; the swarm service (services/swarm/) runs them.

An agent is instructions, a model and what it may reach: tools, agents it may hand the
conversation to (``handoffs``), agents it may call as tools, and graphs and workflows it may
call as tools. A swarm is a set of agents (``members``) with an entry agent and limits. A route
of pattern ``orchestrator`` names one agent: a swarm of one, with the default limits.

A model chooses among what the definition lists, and nothing else: the next agent is one of the
current agent's ``handoffs`` and a member of the swarm; a tool is one of the agent's tools.
Everything else is refused by the service, typed and audited, whatever the model answers.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Literal

from pydantic import Field, model_validator

from contracts.definitions_base import Definition, Location
from contracts.tenants import Name

# A handoff is offered to the model as a tool of this name (the OpenAI Agents SDK's convention).
HANDOFF_PREFIX = "transfer_to_"
# The key of a handoff's result in the history (``{"handed_off_to": <agent>}``).
HANDED_OFF = "handed_off_to"


class HandoffInput(StrEnum):
    """What the agent taking over receives: the whole conversation, or the turn's user message
    with the handoff's reason only (a filtered view: earlier turns and tool results stay out)."""

    FULL = "full"
    MESSAGE = "message"


class Guardrail(Definition):
    """A check on text (a user message an agent receives, an agent's answer, a tool call's
    arguments): refused if it contains any of ``deny`` (case-insensitive), matches ``pattern``, or
    is longer than ``max_chars``. ``message`` is what the refusal says."""

    name: Name
    deny: list[str] = Field(default_factory=list)
    pattern: str | None = None
    max_chars: int | None = Field(default=None, gt=0)
    message: str = "refused by a guardrail"

    @model_validator(mode="after")
    def _checks_something(self) -> Guardrail:
        if not self.deny and self.pattern is None and self.max_chars is None:
            raise ValueError(f"guardrail {self.name!r} needs at least one of 'deny', 'pattern' or 'max_chars'")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"guardrail {self.name!r}: pattern is not a regular expression: {exc}") from None
        return self

    def refuses(self, text: str) -> bool:
        lowered = text.lower()
        if any(word.lower() in lowered for word in self.deny):
            return True
        if self.pattern is not None and re.search(self.pattern, text):
            return True
        return self.max_chars is not None and len(text) > self.max_chars


class AgentDefinition(Definition):
    """One agent: what it is told, the model it speaks with, and everything it may reach."""

    name: Name
    description: str = ""  # shown to other agents: when to hand off to it, or call it as a tool
    instructions: str = ""
    model: Name
    tools: list[Name] = Field(default_factory=list)
    handoffs: list[Name] = Field(default_factory=list)
    agents: list[Name] = Field(default_factory=list)  # agents it may call as tools
    graphs: list[Name] = Field(default_factory=list)  # graphs it may run as tools
    workflows: list[Name] = Field(default_factory=list)  # workflows it may start as tools
    handoff_input: HandoffInput = HandoffInput.FULL
    # Checked on the turn's user message whenever this agent receives it (after a handoff too).
    input_guardrails: list[Name] = Field(default_factory=list)
    # Checked on every answer of this agent.
    output_guardrails: list[Name] = Field(default_factory=list)
    # Checked on the arguments of every call it makes: tools, agents, graphs, workflows, handoffs.
    tool_guardrails: list[Name] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names_do_not_collide(self) -> AgentDefinition:
        if self.name in self.handoffs:
            raise ValueError(f"agent {self.name!r} cannot hand off to itself")
        callable_names = [*self.tools, *self.agents, *self.graphs, *self.workflows]
        seen: set[str] = set()
        for name in callable_names:
            if name in seen:
                raise ValueError(f"agent {self.name!r}: {name!r} is listed twice among its tools")
            if name.startswith(HANDOFF_PREFIX):
                raise ValueError(f"agent {self.name!r}: tool names starting {HANDOFF_PREFIX!r} are handoffs'")
            seen.add(name)
        return self

    def uses(self) -> list[tuple[str, str, Location]]:
        """Every model, tool, agent, graph, workflow and guardrail it names: (what, name, where)."""
        found: list[tuple[str, str, Location]] = [("model", self.model, ("model",))]
        for what, key in (
            ("tool", "tools"),
            ("agent", "handoffs"),
            ("agent", "agents"),
            ("graph", "graphs"),
            ("workflow", "workflows"),
            ("guardrail", "input_guardrails"),
            ("guardrail", "output_guardrails"),
            ("guardrail", "tool_guardrails"),
        ):
            found += [(what, name, (key, index)) for index, name in enumerate(getattr(self, key))]
        return found


class SwarmLimits(Definition):
    """Limits of a conversation, on by default: each ends the turn with ``limit_exceeded`` and a
    ``limit_reached`` event when it fires."""

    max_handoffs_per_turn: int = Field(default=5, ge=0, le=100)
    max_handoffs_per_session: int = Field(default=100, ge=0, le=100_000)
    max_model_calls_per_turn: int = Field(default=20, ge=1, le=1000)
    model_call_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    turn_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    max_tokens_per_turn: int = Field(default=100_000, ge=1)
    max_tokens_per_session: int = Field(default=1_000_000, ge=1)
    # Loop detection: a handoff from one agent to another repeated this often in one turn (A to B
    # to A to B ...) ends the turn. 0 turns it off.
    max_repeated_handoffs: int = Field(default=2, ge=0, le=100)


class SessionPolicy(Definition):
    """How much of a conversation is kept: the last ``max_messages`` (cut at a user message, so
    a tool call is never kept without its result)."""

    max_messages: int = Field(default=100, ge=2, le=10_000)


class SwarmDefinition(Definition):
    """Agents that hand a conversation to one another, starting at ``entry``."""

    name: Name
    description: str = ""
    entry: Name
    members: list[Name] = Field(min_length=1)
    limits: SwarmLimits = Field(default_factory=SwarmLimits)
    session: SessionPolicy = Field(default_factory=SessionPolicy)
    # What several handoffs in one answer do: refused (each gets a refusal as its result and the
    # agent answers again). The only behaviour; declared so that a definition says it.
    parallel_handoffs: Literal["refuse"] = "refuse"

    @model_validator(mode="after")
    def _entry_is_a_member(self) -> SwarmDefinition:
        if self.entry not in self.members:
            raise ValueError(f"swarm {self.name!r}: entry {self.entry!r} is not one of its members")
        if len(set(self.members)) != len(self.members):
            raise ValueError(f"swarm {self.name!r}: an agent is listed twice among its members")
        return self

    def uses(self) -> list[tuple[str, str, Location]]:
        return [("agent", name, ("members", index)) for index, name in enumerate(self.members)]


def single_agent(agent: str) -> SwarmDefinition:
    """The orchestrator's swarm: one agent, the default limits."""
    return SwarmDefinition(name=agent, entry=agent, members=[agent])
