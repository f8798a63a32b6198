"""The comparison sides of ``corral bench swarm``: the conversation of ``bench.yaml``'s
``bench_swarm`` (three agents, a -> b -> c: two handoffs, two tool calls, c answers) in process
with the agent frameworks users would pick instead, each on a scripted model of its own kind.

- ``openai_agents``: the OpenAI Agents SDK. Three agents (``Agent``; a and b with a ``function_tool``
  and a handoff each), every one on :class:`_ScriptedAgentsModel`, an implementation of the SDK's
  ``Model`` interface that answers by rules as Corral's scripted model does; ``Runner.run`` per
  conversation. Tracing is off: its default exporter sends traces to OpenAI's servers.
- ``strands``: Strands Agents. Three agents in a ``strands.multiagent.Swarm``, every one on
  :class:`_ScriptedStrandsModel` (Strands' ``Model`` interface, a stream of events). A handoff is
  Strands' own ``handoff_to_agent`` tool, after which the agent handing off still ends its turn
  with a message: seven model calls a conversation, against five on Corral and the SDK.

Both run on the bench's event loop; throughput has ``concurrency`` conversations in flight as
tasks (Strands: one ``Swarm`` per lane, since a Swarm runs one conversation at a time). Each side
checks every conversation's outcome (the last agent and its answer) inside the timed call, as
Corral's side does. A side whose package is missing (``pip install -e '.[bench]'``), or that fails,
returns ``{"error": ...}`` and the other still runs.

``python -m corral.bench.swarm_others [--json] [--quick] [--sides openai_agents,strands]``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from corral.bench import percentile
from corral.bench.workflow_others import Counts, measure_latencies, measure_throughput, run_sides
from services.runtime import loop as event_loop

SIDES = ("openai_agents", "strands")
# Both benches' counts (the workflow bench's structure; its recovery counts are not used here).
DEFAULT = Counts(warmup=20, latency_runs=200, throughput_runs=1000, concurrency=32)
QUICK = Counts(warmup=3, latency_runs=20, throughput_runs=100, concurrency=32)

# The conversation, as bench.yaml has it.
A, B, C = "bench_agent_a", "bench_agent_b", "bench_agent_c"
MESSAGE = "Run the benchmark conversation."
ANSWER = "Done at step 2."
INSTRUCTIONS = {
    A: f"Take the first step, then hand the conversation to {B}.",
    B: f"Take the second step, then hand the conversation to {C}.",
    C: "Say which step the conversation reached.",
}
STEP_DESCRIPTION = "Adds one (the step of the workflow benchmark)."


async def bench_step(value: int) -> dict[str, int]:
    """The tool a and b call: ``corral.demo.tools.bench_step`` without its tool context."""
    return {"value": value + 1}


class ConversationError(RuntimeError):
    """A conversation did not end as scripted (its last agent or answer is another)."""


@dataclass(frozen=True)
class _Call:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class _Script:
    """One agent's scripted model, like a ``scripted:`` model of bench.yaml: the first rule whose
    text is in the latest input (a tool result, or the message the agent was given) answers,
    else ``default``; an answer is a tool call or text."""

    rules: tuple[tuple[str, _Call | str], ...]
    default: _Call | str

    def reply(self, latest: str) -> _Call | str:
        return next((reply for needle, reply in self.rules if needle in latest), self.default)


# --- the OpenAI Agents SDK ---

# The SDK gives a tool's dict result to the model as Python's repr: ``{'value': 1}``.
_AGENTS_SCRIPTS = {
    A: _Script((("'value': 1", _Call(f"transfer_to_{B}", {})),), _Call("bench_step", {"value": 0})),
    B: _Script((("'value': 2", _Call(f"transfer_to_{C}", {})),), _Call("bench_step", {"value": 1})),
    C: _Script((), ANSWER),
}


def _agents_latest_input(items: str | list[Any]) -> str:
    """The latest user message or tool result of the SDK's input items; an agent just handed the
    conversation reads the user's message (Corral's scripted model does the same)."""
    if isinstance(items, str):
        return items
    handoffs = {
        item.get("call_id")
        for item in items
        if item.get("type") == "function_call" and str(item.get("name", "")).startswith("transfer_to_")
    }
    after_handoff = bool(items) and items[-1].get("call_id") in handoffs
    for item in reversed(items):
        if item.get("role") == "user":
            return str(item.get("content") or "")
        if item.get("type") == "function_call_output" and not after_handoff and item.get("call_id") not in handoffs:
            return str(item.get("output") or "")
    return ""


def _agents_model_class() -> type:
    from agents import Model, ModelResponse, Usage
    from agents.testing import assistant_message, function_call

    class _ScriptedAgentsModel(Model):
        """The SDK's ``Model`` interface answered by a :class:`_Script`; no network."""

        def __init__(self, script: _Script) -> None:
            self.script = script

        async def get_response(
            self,
            system_instructions: Any,
            input: Any,
            model_settings: Any,
            tools: Any,
            output_schema: Any,
            handoffs: Any,
            tracing: Any,
            *,
            previous_response_id: Any,
            conversation_id: Any,
            prompt: Any,
        ) -> Any:
            reply = self.script.reply(_agents_latest_input(input))
            if isinstance(reply, str):
                output = [assistant_message(reply)]
            else:  # a call id unique in the conversation: one more than the calls so far
                asked = 0 if isinstance(input, str) else sum(1 for i in input if i.get("type") == "function_call")
                output = [function_call(reply.name, reply.arguments, call_id=f"call_{asked}")]
            return ModelResponse(output=output, usage=Usage(requests=1), response_id=None)

        def stream_response(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("the benchmark runs the SDK without streaming")

    return _ScriptedAgentsModel


def build_openai_agents() -> Callable[[], Awaitable[Any]]:
    """One conversation with the SDK (``Runner.run``); returns its ``RunResult``."""
    from agents import Agent, RunConfig, Runner, function_tool

    scripted = _agents_model_class()
    step = function_tool(bench_step, description_override=STEP_DESCRIPTION)
    last = Agent(name=C, instructions=INSTRUCTIONS[C], model=scripted(_AGENTS_SCRIPTS[C]))
    second = Agent(
        name=B, instructions=INSTRUCTIONS[B], model=scripted(_AGENTS_SCRIPTS[B]), tools=[step], handoffs=[last]
    )
    first = Agent(
        name=A, instructions=INSTRUCTIONS[A], model=scripted(_AGENTS_SCRIPTS[A]), tools=[step], handoffs=[second]
    )
    config = RunConfig(tracing_disabled=True)

    async def converse() -> Any:
        result = await Runner.run(first, MESSAGE, run_config=config)
        if result.last_agent.name != C or result.final_output != ANSWER:
            raise ConversationError(f"ended with {result.last_agent.name}: {result.final_output!r}")
        return result

    return converse


# --- Strands Agents ---

# Strands gives a tool's dict result to the model as JSON, and its handoff tool answers
# "Handing off to <agent>: <message>"; the agent handing off then ends its turn.
_STRANDS_SCRIPTS = {
    A: _Script(
        (
            ("Handing off to", f"Handed over to {B}."),
            ('"value": 1', _Call("handoff_to_agent", {"agent_name": B, "message": "step 1 done"})),
        ),
        _Call("bench_step", {"value": 0}),
    ),
    B: _Script(
        (
            ("Handing off to", f"Handed over to {C}."),
            ('"value": 2', _Call("handoff_to_agent", {"agent_name": C, "message": "step 2 done"})),
        ),
        _Call("bench_step", {"value": 1}),
    ),
    C: _Script((), ANSWER),
}


def _strands_latest_input(messages: list[dict[str, Any]]) -> str:
    """The text of the latest message's blocks: tool results' text, or what the agent was given."""
    texts: list[str] = []
    for block in messages[-1]["content"] if messages else ():
        if "toolResult" in block:
            texts += [part.get("text", "") for part in block["toolResult"].get("content", [])]
        elif "text" in block:
            texts.append(block["text"])
    return "\n".join(texts)


def _strands_model_class() -> type:
    from strands.models.model import Model

    class _ScriptedStrandsModel(Model):
        """Strands' ``Model`` interface answered by a :class:`_Script`: the events a provider streams."""

        def __init__(self, script: _Script) -> None:
            self.script = script

        def update_config(self, **model_config: Any) -> None:
            return None

        def get_config(self) -> dict[str, Any]:
            return {}

        async def structured_output(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("the benchmark asks for no structured output")
            yield  # an async generator, as the interface has it

        async def stream(self, messages: Any, tool_specs: Any = None, system_prompt: Any = None, **kwargs: Any) -> Any:
            reply = self.script.reply(_strands_latest_input(messages))
            yield {"messageStart": {"role": "assistant"}}
            if isinstance(reply, str):
                yield {"contentBlockDelta": {"delta": {"text": reply}}}
                yield {"contentBlockStop": {}}
                yield {"messageStop": {"stopReason": "end_turn"}}
            else:
                asked = sum(1 for m in messages for block in m["content"] if "toolUse" in block)
                tool_use = {"toolUseId": f"tooluse_{asked}", "name": reply.name}
                yield {"contentBlockStart": {"start": {"toolUse": tool_use}}}
                yield {"contentBlockDelta": {"delta": {"toolUse": {"input": json.dumps(reply.arguments)}}}}
                yield {"contentBlockStop": {}}
                yield {"messageStop": {"stopReason": "tool_use"}}
            yield {"metadata": {"usage": {"inputTokens": 0, "outputTokens": 0, "totalTokens": 0}, "metrics": {}}}

    return _ScriptedStrandsModel


def build_strands_swarm() -> Any:
    """A ``strands.multiagent.Swarm`` of the three agents (it runs one conversation at a time)."""
    from strands import Agent, tool
    from strands.multiagent import Swarm

    scripted = _strands_model_class()
    step = tool(bench_step, description=STEP_DESCRIPTION)

    def agent(name: str, tools: list[Any]) -> Any:
        model = scripted(_STRANDS_SCRIPTS[name])
        return Agent(name=name, system_prompt=INSTRUCTIONS[name], model=model, tools=tools, callback_handler=None)

    first = agent(A, [step])
    return Swarm([first, agent(B, [step]), agent(C, [])], entry_point=first)


async def strands_converse(swarm: Any) -> Any:
    """One conversation on ``swarm``; returns its ``SwarmResult``."""
    from strands.multiagent.base import Status

    result = await swarm.invoke_async(MESSAGE)
    answer = result.results[C].result.message["content"][0].get("text") if C in result.results else None
    if result.status is not Status.COMPLETED or result.node_history[-1].node_id != C or answer != ANSWER:
        raise ConversationError(f"ended {result.status.value} with {result.node_history[-1].node_id}: {answer!r}")
    return result


# --- measuring ---


def _figures(latencies: list[float], rps: float, counts: Counts, notes: str) -> dict[str, Any]:
    return {
        "p50_ms": round(percentile(latencies, 0.5), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "rps": round(rps, 1),
        "runs": counts.latency_runs,
        "throughput_runs": counts.throughput_runs,
        "concurrency": counts.concurrency,
        "notes": notes,
    }


async def openai_agents_side(counts: Counts) -> dict[str, Any]:
    converse = build_openai_agents()
    latencies = await measure_latencies(converse, counts)
    rps = await measure_throughput(converse, counts)
    notes = (
        "openai-agents in process, Runner.run per conversation (no session kept), a scripted Model per agent, "
        "tracing off; 5 model calls a conversation; every handoff the SDK's own transfer_to_<agent> tool"
    )
    return _figures(latencies, rps, counts, notes)


async def strands_side(counts: Counts) -> dict[str, Any]:
    swarms = [build_strands_swarm() for _ in range(counts.concurrency)]

    async def converse() -> Any:
        swarm = swarms.pop()  # at most ``concurrency`` conversations in flight: one is always free
        try:
            return await strands_converse(swarm)
        finally:
            swarms.append(swarm)

    latencies = await measure_latencies(converse, counts)
    rps = await measure_throughput(converse, counts)
    notes = (
        "strands-agents in process, Swarm.invoke_async per conversation (no session kept), a scripted Model "
        "per agent; 7 model calls a conversation (the agent handing off ends its turn after handoff_to_agent); "
        "any agent may hand off to any other (a Swarm has no per-agent handoff list)"
    )
    return _figures(latencies, rps, counts, notes)


_SIDE_FUNCTIONS: dict[str, Callable[[Counts], Awaitable[dict[str, Any]]]] = {
    "openai_agents": openai_agents_side,
    "strands": strands_side,
}


async def run_others_async(
    sides: Sequence[str] = SIDES, quick: bool = False, counts: Counts | None = None
) -> dict[str, dict[str, Any]]:
    """The figures of each side, one side after another."""
    return await run_sides(_SIDE_FUNCTIONS, sides, counts or (QUICK if quick else DEFAULT))


def run_others(
    sides: Sequence[str] = SIDES, quick: bool = False, counts: Counts | None = None
) -> dict[str, dict[str, Any]]:
    """:func:`run_others_async` on Corral's event loop, for callers without a running loop."""
    return event_loop.run(run_others_async(sides, quick, counts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m corral.bench.swarm_others", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke test")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {','.join(SIDES)}")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    results = run_others([side.strip() for side in args.sides.split(",") if side.strip()], quick=args.quick)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for side, figures in results.items():
            if "error" in figures:
                print(f"{side:<14} error: {figures['error']}")
            else:
                p50, p99, rps = figures["p50_ms"], figures["p99_ms"], figures["rps"]
                print(f"{side:<14} p50 {p50:.2f} ms  p99 {p99:.2f} ms  {rps:.0f} conversations/s")
    return 1 if any("error" in figures for figures in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
