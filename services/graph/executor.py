"""Runs graph definitions: explicit nodes, conditional edges, parallel branches, joins.

No NATS here: tool and model calls and progress events go through the :class:`Runtime` the
caller passes in, so the executor is tested without a broker.

Determinism: a run proceeds in steps. All nodes active in a step run concurrently; when every one
has finished, their outputs are applied to the state in node declaration order (through the
graph's reducers), and the next step's nodes are chosen from the edges in the same order. So the
same input and the same tool and model results give the same path, state and output, whatever
order parallel branches finish in.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import jsonschema

from contracts.definitions import ToolDefinition
from contracts.definitions_base import DefinitionError
from contracts.errors import CorralError, DeadlineExceeded
from contracts.expressions import (
    Compiled,
    compile_arguments,
    compile_expression,
    compile_path,
    compile_template,
    evaluate,
    render,
)
from contracts.graphs import (
    END,
    AgentNode,
    FunctionNode,
    GraphDefinition,
    JoinNode,
    JoinWait,
    ModelNode,
    Reducer,
    RespondNode,
    SubgraphNode,
    ToolNode,
)
from services.graph.errors import (
    DepthLimitExceeded,
    InvalidModelOutput,
    JoinIncomplete,
    NodeTimedOut,
    ReducerFailed,
    RunTimedOut,
    StepLimitExceeded,
    TurnLimitExceeded,
    VisitLimitExceeded,
)
from services.llm import Completion, assistant_message

MAX_SUBGRAPH_DEPTH = 8


class Runtime(Protocol):
    """What the executor needs from the outside world: tool and model calls, and where progress
    events go (``node_event``: (kind, node, elapsed_ms, data), or None when nobody listens)."""

    async def call_tool(self, tool: str, arguments: dict[str, Any], timeout: float) -> Any: ...

    async def call_model(
        self,
        model: str,
        messages: list[dict[str, Any]],
        schema: dict[str, Any] | None,
        timeout: float,
        tool_schemas: list[dict[str, Any]] | None,
    ) -> Completion: ...

    @property
    def node_event(self) -> Callable[[str, str, float | None, dict[str, Any]], Awaitable[None]] | None: ...


@dataclass(frozen=True)
class RunOutcome:
    output: Any
    path: tuple[str, ...]  # nodes in the order they ran (within a step: declaration order)
    state: dict[str, Any]


@dataclass(frozen=True)
class _Transition:
    targets: tuple[str, ...]
    condition: Compiled | None


@dataclass(slots=True)
class _Run:
    state: dict[str, Any]
    path: list[str] = field(default_factory=list)
    visits: dict[str, int] = field(default_factory=dict)
    arrived: dict[str, list[str]] = field(default_factory=dict)  # join -> branches arrived
    dropped_any: dict[str, int] = field(default_factory=dict)  # 'any' join -> late arrivals to drop
    outputs: dict[str, Any] = field(default_factory=dict)  # each node's latest own output
    last_output: Any = None
    # (time.monotonic() deadline, limit in seconds) when tool calls carry the run's deadline
    deadline: tuple[float, float] | None = None


def _apply(reducer: Reducer, current: Any, value: Any) -> Any:
    if current is None and reducer not in (Reducer.APPEND, Reducer.EXTEND):
        return value
    match reducer:
        case Reducer.REPLACE:
            return value
        case Reducer.APPEND:
            return [*(current or []), value]
        case Reducer.EXTEND:
            return [*(current or []), *(value if isinstance(value, list) else [value])]
        case Reducer.MERGE:
            return {**current, **value} if isinstance(current, dict) and isinstance(value, dict) else value
        case Reducer.SUM:
            return current + value
        case Reducer.MAX:
            return max(current, value)
        case Reducer.MIN:
            return min(current, value)


class CompiledGraph:
    """A validated graph with conditions parsed and functions imported once; reusable across runs."""

    def __init__(
        self,
        definition: GraphDefinition,
        library: dict[str, CompiledGraph] | None = None,
        tools: dict[str, ToolDefinition] | None = None,
    ) -> None:
        self.definition = definition
        self.library = library if library is not None else {}
        # What an agent node's model is shown of each tool: never the tenant (the runtime's).
        self._tool_schemas = {
            name: [_tool_schema(tools, tool) for tool in node.tools]
            for name, node in definition.nodes.items()
            if isinstance(node, AgentNode)
        }
        self.order = {name: index for index, name in enumerate(definition.nodes)}
        conditional: dict[str, list[_Transition]] = {name: [] for name in definition.nodes}
        default: dict[str, list[_Transition]] = {name: [] for name in definition.nodes}
        for edge in definition.edges:
            if edge.when is None:
                default[edge.source].append(_Transition(edge.targets, None))
            else:
                conditional[edge.source].append(_Transition(edge.targets, compile_expression(edge.when)))
        self._transitions = {name: conditional[name] + default[name] for name in definition.nodes}
        self._branches = {
            name: definition.incoming(name) for name, node in definition.nodes.items() if isinstance(node, JoinNode)
        }
        self._schemas = {
            name: jsonschema.validators.validator_for(node.output_schema)(node.output_schema)
            for name, node in definition.nodes.items()
            if isinstance(node, ModelNode) and node.output_schema is not None
        }
        self._functions = {
            name: _import(node.callable) for name, node in definition.nodes.items() if isinstance(node, FunctionNode)
        }
        # Argument templates, response templates and paths parsed once, not on every run.
        nodes = definition.nodes.items()
        self._arguments = {
            name: compile_arguments(node.args) for name, node in nodes if isinstance(node, ToolNode | FunctionNode)
        }
        self._arguments.update(
            {name: compile_arguments(node.input) for name, node in nodes if isinstance(node, SubgraphNode)}
        )
        self._templates = {
            name: compile_template(node.template) for name, node in nodes if isinstance(node, RespondNode)
        }
        self._keys = {name: definition.output_key(name) for name in definition.nodes}
        # None: the output replaces what is there (the default reducer, without the call).
        self._reducers = {
            name: None if (reducer := definition.reducers.get(key, Reducer.REPLACE)) is Reducer.REPLACE else reducer
            for name, key in self._keys.items()
        }
        self._visit_limits = {name: node.max_visits for name, node in nodes}
        self._timed = frozenset(name for name, node in nodes if isinstance(node, FunctionNode | SubgraphNode))
        self._self_bounded = all(isinstance(node, ToolNode | RespondNode | JoinNode) for _, node in nodes)
        self._output = compile_path(definition.output) if definition.output else None

    def next_nodes(self, node: str, state: dict[str, Any]) -> tuple[str, ...]:
        for transition in self._transitions[node]:
            if transition.condition is None or evaluate(transition.condition, state):
                return transition.targets
        return ()

    async def run(self, graph_input: dict[str, Any], runtime: Runtime, *, timeout: float) -> RunOutcome:
        """Run from the entry node until no node is active; raises a typed error on any limit."""
        limit = min(timeout, self.definition.timeout_s)
        if self._self_bounded:
            # Every node finishes in place or is a tool call, and each tool call is given no more
            # than what is left of the run: the deadline holds without a timer around the run.
            return await self._run(graph_input, runtime, depth=0, deadline=(time.monotonic() + limit, limit))
        try:
            async with asyncio.timeout(limit):
                return await self._run(graph_input, runtime, depth=0)
        except TimeoutError:
            raise self._timed_out(limit) from None

    def _timed_out(self, limit: float) -> RunTimedOut:
        return RunTimedOut(f"graph {self.definition.name!r} did not finish within {limit:.2f}s")

    async def _run(
        self,
        graph_input: dict[str, Any],
        runtime: Runtime,
        depth: int,
        deadline: tuple[float, float] | None = None,
    ) -> RunOutcome:
        run = _Run(state={"input": graph_input}, deadline=deadline)
        active = [self.definition.entry]
        # Respond nodes finish in place and cannot fail: with no one to tell, one is just its template.
        instant = self._templates if runtime.node_event is None else {}
        while active:
            if len(run.path) + len(active) > self.definition.max_steps:
                raise StepLimitExceeded(
                    f"graph {self.definition.name!r} exceeded its limit of {self.definition.max_steps} steps"
                )
            if len(active) == 1:  # a step of one node (most steps): no task, no dict of outputs
                name = active[0]
                self._visit(run, name)
                template = instant.get(name)
                if template is not None:
                    self._write(run, name, template(run.state))
                else:
                    self._write(run, name, await self._node(name, run, runtime, depth))
                active = self._advance(run, active)
                continue
            for name in active:
                self._visit(run, name)
            outputs = await self._step(active, run, runtime, depth)
            for name in active:  # declaration order, whatever order they finished in
                self._write(run, name, outputs[name])
            active = self._advance(run, active)
        waiting = {join: arrived for join, arrived in run.arrived.items() if arrived}
        if waiting:
            join, arrived = next(iter(waiting.items()))
            missing = [b for b in self._branches[join] if b not in arrived]
            raise JoinIncomplete(f"join {join!r} is still waiting for {missing} after the run ended")
        output = self._output(run.state) if self._output is not None else run.last_output
        return RunOutcome(output=output, path=tuple(run.path), state=run.state)

    def _visit(self, run: _Run, name: str) -> None:
        limit = self._visit_limits[name]
        if limit is None:  # visits are only counted against a limit
            return
        count = run.visits[name] = run.visits.get(name, 0) + 1
        if count > limit:
            raise VisitLimitExceeded(f"node {name!r} exceeded its limit of {limit} visits")

    def _write(self, run: _Run, name: str, output: Any) -> None:
        key = self._keys[name]
        reducer = self._reducers[name]
        if reducer is None:
            run.state[key] = output
        else:
            try:
                run.state[key] = _apply(reducer, run.state.get(key), output)
            except TypeError:
                message = f"reducer {reducer.value!r} cannot combine the outputs written to {key!r}"
                raise ReducerFailed(message) from None
        run.path.append(name)
        run.outputs[name] = run.last_output = output

    def _advance(self, run: _Run, finished: list[str]) -> list[str]:
        following: list[str] = []
        for name in finished:
            for target in self.next_nodes(name, run.state):
                if target == END:
                    continue
                if target in self._branches and not self._arrive(run, target, name):
                    continue
                if target not in following:
                    following.append(target)
        return following if len(following) < 2 else sorted(following, key=self.order.__getitem__)

    def _arrive(self, run: _Run, join: str, branch: str) -> bool:
        """Record a branch arriving at a join; True when the join is ready to run."""
        node = self.definition.nodes[join]
        assert isinstance(node, JoinNode)
        branches = self._branches[join]
        if node.wait is JoinWait.ANY:
            if run.dropped_any.get(join, 0) > 0:  # a late branch of a round that already went on
                run.dropped_any[join] -= 1
                return False
            run.arrived.setdefault(join, []).append(branch)
            return True
        arrived = run.arrived.setdefault(join, [])
        if branch not in arrived:
            arrived.append(branch)
        return all(b in arrived for b in branches)

    async def _step(self, active: list[str], run: _Run, runtime: Runtime, depth: int) -> dict[str, Any]:
        """Several nodes at once (``_run`` runs a single node in place)."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = {name: group.create_task(self._node(name, run, runtime, depth)) for name in active}
        except BaseExceptionGroup as failures:
            # Report the failure of the first node in declaration order, not the first to fail.
            failed = [
                name
                for name in active
                if tasks[name].done() and not tasks[name].cancelled() and tasks[name].exception() is not None
            ]
            raise (tasks[failed[0]].exception() if failed else failures.exceptions[0]) from None
        return {name: task.result() for name, task in tasks.items()}

    async def _node(self, name: str, run: _Run, runtime: Runtime, depth: int) -> Any:
        node = self.definition.nodes[name]
        report = runtime.node_event
        if report is not None:
            await report("node_started", name, None, {})
        started = time.perf_counter()
        try:
            if name in self._timed:
                async with asyncio.timeout(node.timeout_s):
                    output = await self._execute(name, run, runtime, depth)
            else:
                # Respond and join nodes finish in place; tool and model calls carry the
                # node's timeout themselves (a bus request or HTTP timeout), which is cheaper.
                output = await self._execute(name, run, runtime, depth)
        except TimeoutError:
            error: CorralError = NodeTimedOut(f"node {name!r} did not finish within {node.timeout_s:g}s")
            if report is not None:
                await report("node_failed", name, _ms(started), {"code": error.code.value})
            raise error from None
        except CorralError as failure:
            if isinstance(failure, DeadlineExceeded) and not isinstance(failure, NodeTimedOut | RunTimedOut):
                failure = NodeTimedOut(f"node {name!r} did not finish within {node.timeout_s:g}s: {failure.message}")
            if report is not None:
                await report("node_failed", name, _ms(started), {"code": failure.code.value})
            raise failure from None
        if report is not None:
            await report("node_completed", name, _ms(started), {})
        return output

    async def _execute(self, name: str, run: _Run, runtime: Runtime, depth: int) -> Any:
        node = self.definition.nodes[name]
        state = run.state
        match node:
            case ToolNode():
                arguments = self._arguments[name](state)
                if run.deadline is not None:
                    deadline, limit = run.deadline
                    left = deadline - time.monotonic()
                    if left < node.timeout_s:  # the run ends first: its deadline is the call's
                        if left <= 0:
                            raise self._timed_out(limit)
                        try:
                            return await runtime.call_tool(node.tool, arguments, left)
                        except DeadlineExceeded:
                            raise self._timed_out(limit) from None
                return await runtime.call_tool(node.tool, arguments, node.timeout_s)
            case RespondNode():
                return self._templates[name](state)
            case JoinNode():
                return self._join_output(name, run)
            case FunctionNode():
                function = self._functions[name]
                result = function(**self._arguments[name](state))
                return await result if inspect.isawaitable(result) else result
            case ModelNode():
                return await self._ask_model(name, node, state, runtime)
            case AgentNode():
                return await self._run_agent(name, node, state, runtime)
            case SubgraphNode():
                return await self._subgraph(name, node, state, runtime, depth)
        raise AssertionError(f"unhandled node {node!r}")  # the schema admits no other kind

    def _join_output(self, name: str, run: _Run) -> dict[str, Any]:
        """Each arrived branch's output, in declaration order; the join is then reset for cycles."""
        arrived = run.arrived.pop(name, [])
        branches = self._branches[name]
        node = self.definition.nodes[name]
        if isinstance(node, JoinNode) and node.wait is JoinWait.ANY:
            run.dropped_any[name] = len(branches) - len(arrived)
        return {branch: run.outputs.get(branch) for branch in branches if branch in arrived}

    async def _ask_model(self, name: str, node: ModelNode, state: dict[str, Any], runtime: Runtime) -> Any:
        model = node.model or self.definition.model
        assert model is not None  # checked when the graph was defined
        messages = [{"role": "system", "content": render(node.system, state)}] if node.system else []
        messages.append({"role": "user", "content": render(node.prompt, state)})
        answer = (await runtime.call_model(model, messages, node.output_schema, node.timeout_s, None)).content
        if node.output_schema is None:
            return answer
        try:
            parsed = json.loads(answer) if isinstance(answer, str) else answer
            self._schemas[name].validate(parsed)
        except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
            message = exc.message if isinstance(exc, jsonschema.ValidationError) else "not JSON"
            raise InvalidModelOutput(f"model {model!r} answered outside the output schema: {message}") from None
        return parsed

    async def _run_agent(self, name: str, node: AgentNode, state: dict[str, Any], runtime: Runtime) -> Any:
        """Model turns with tool calls until the model answers; tools outside the node's list are
        refused to the model (and the tools service checks the tenant's policy on every call)."""
        model = node.model or self.definition.model
        assert model is not None  # checked when the graph was defined
        messages: list[dict[str, Any]] = (
            [{"role": "system", "content": render(node.system, state)}] if node.system else []
        )
        messages.append({"role": "user", "content": render(node.prompt, state)})
        schemas = self._tool_schemas[name]
        calls = 0
        for _ in range(node.max_turns):
            answer = await runtime.call_model(model, messages, None, node.timeout_s, schemas)
            if not answer.tool_calls:
                return {"answer": answer.content, "tool_calls": calls}
            messages.append(assistant_message(answer))
            for call in answer.tool_calls:
                calls += 1
                result = await self._agent_tool(node, call.name, call.arguments, runtime)
                messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
        raise TurnLimitExceeded(f"agent node {name!r} did not answer within {node.max_turns} turns")

    async def _agent_tool(self, node: AgentNode, tool: str, arguments: dict[str, Any], runtime: Runtime) -> Any:
        """One tool call asked for by a model; failures go back to the model as data, typed."""
        if tool not in node.tools:
            return {"error": "forbidden", "message": f"tool {tool!r} is not available here"}
        try:
            return await runtime.call_tool(tool, arguments, node.timeout_s)
        except CorralError as error:
            return {"error": error.code.value, "message": error.message}

    async def _subgraph(
        self, name: str, node: SubgraphNode, state: dict[str, Any], runtime: Runtime, depth: int
    ) -> Any:
        if depth >= MAX_SUBGRAPH_DEPTH:
            raise DepthLimitExceeded(f"subgraphs nested deeper than {MAX_SUBGRAPH_DEPTH}")
        child = self.library[node.graph]
        outcome = await child._run(self._arguments[name](state), runtime, depth + 1)
        return outcome.output


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _import(target: str) -> Callable[..., Any]:
    module_name, _, attribute = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise DefinitionError(f"cannot import function {target!r}: {exc}") from None


def _tool_schema(tools: dict[str, ToolDefinition] | None, name: str) -> dict[str, Any]:
    definition = (tools or {}).get(name)
    if definition is None:
        return {"name": name, "description": "", "parameters": {"type": "object"}}
    return {"name": name, "description": definition.description, "parameters": definition.parameters}


def compile_library(
    graphs: dict[str, GraphDefinition], tools: dict[str, ToolDefinition] | None = None
) -> dict[str, CompiledGraph]:
    """Compile every graph, sharing one library so subgraph nodes find their graphs."""
    library: dict[str, CompiledGraph] = {}
    for name, definition in graphs.items():
        library[name] = CompiledGraph(definition, library, tools)
    return library
