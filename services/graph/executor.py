"""Runs one graph definition: explicit nodes, conditional edges, deterministic path.

No NATS here: tool calls and progress events go through the callables the caller passes in, so
the executor is tested without a broker. The same input and the same tool results always give
the same path, state and output: edges are tried in declaration order, conditional ones first,
and the first edge whose condition holds is taken.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from contracts.definitions import END, GraphDefinition, RespondNode, ToolNode
from contracts.expressions import Compiled, compile_expression, evaluate, render, resolve
from services.graph.errors import RunTimedOut, StepLimitExceeded

CallTool = Callable[[str, dict[str, Any], float], Awaitable[Any]]
NodeDone = Callable[[str, float], Awaitable[None]]


@dataclass(frozen=True)
class _Transition:
    target: str
    condition: Compiled | None


@dataclass(frozen=True)
class RunOutcome:
    output: Any
    path: tuple[str, ...]
    state: dict[str, Any]


class CompiledGraph:
    """A validated graph with its conditions parsed once; immutable and reusable across runs."""

    def __init__(self, definition: GraphDefinition) -> None:
        self.definition = definition
        transitions: dict[str, list[_Transition]] = {name: [] for name in definition.nodes}
        defaults: dict[str, list[_Transition]] = {name: [] for name in definition.nodes}
        for edge in definition.edges:
            if edge.when is None:
                defaults[edge.source].append(_Transition(edge.target, None))
            else:
                transitions[edge.source].append(_Transition(edge.target, compile_expression(edge.when)))
        self._next = {name: transitions[name] + defaults[name] for name in definition.nodes}

    def next_node(self, node: str, state: dict[str, Any]) -> str:
        for transition in self._next[node]:
            if transition.condition is None or evaluate(transition.condition, state):
                return transition.target
        return END

    async def run(
        self, graph_input: dict[str, Any], *, call_tool: CallTool, node_done: NodeDone, timeout: float
    ) -> RunOutcome:
        """Run from the entry node to the end; raises a typed error on timeout or step limit."""
        limit = min(timeout, self.definition.timeout_s)
        try:
            async with asyncio.timeout(limit):
                return await self._walk(graph_input, call_tool, node_done)
        except TimeoutError:
            raise RunTimedOut(f"graph {self.definition.name!r} did not finish within {limit:.1f}s") from None

    async def _walk(self, graph_input: dict[str, Any], call_tool: CallTool, node_done: NodeDone) -> RunOutcome:
        state: dict[str, Any] = {"input": graph_input}
        path: list[str] = []
        output: Any = None
        node = self.definition.entry
        while node != END:
            if len(path) >= self.definition.max_steps:
                raise StepLimitExceeded(
                    f"graph {self.definition.name!r} exceeded its limit of {self.definition.max_steps} steps"
                )
            started = time.perf_counter()
            output = await self._run_node(node, state, call_tool)
            state[node] = output
            path.append(node)
            await node_done(node, (time.perf_counter() - started) * 1000)
            node = self.next_node(node, state)
        return RunOutcome(output=output, path=tuple(path), state=state)

    async def _run_node(self, name: str, state: dict[str, Any], call_tool: CallTool) -> Any:
        node = self.definition.nodes[name]
        if isinstance(node, ToolNode):
            return await call_tool(node.tool, resolve(node.args, state), node.timeout_s)
        if isinstance(node, RespondNode):
            return render(node.template, state)
        raise AssertionError(f"unhandled node kind {node!r}")  # the schema admits no other kind
