"""Graph definitions: explicit nodes, conditional edges, fan-out, joins and reducers.

A graph runs in steps. Every node active in a step runs concurrently; their outputs are written to
the run state in declaration order (through a reducer where one is declared), so the result never
depends on which branch finished first. From each node the first edge whose condition holds is
taken (conditional edges before the default one); an edge may fan out to several nodes. A join
node waits for ``all`` or ``any`` of the branches that lead into it.

What a node's templates, arguments and edge conditions read is checked at load: the input (and
its fields, against ``input_schema`` when the graph declares one) or a key that every path from
the entry writes before the node runs (``contracts/references.py``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import ConfigDict, Field, JsonValue, field_validator, model_validator

from contracts.definitions_base import Definition, Location, Problem, Problems, did_you_mean
from contracts.expressions import ExpressionError, compile_expression
from contracts.references import (
    Reference,
    argument_references,
    argument_slips,
    condition_references,
    input_field_problem,
    template_references,
    template_slips,
)
from contracts.tenants import Name

END = "end"
RESERVED_KEYS = frozenset({END, "input"})
CALLABLE_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class NodeKind(StrEnum):
    TOOL = "tool"
    MODEL = "model"
    AGENT = "agent"
    FUNCTION = "function"
    SUBGRAPH = "subgraph"
    RESPOND = "respond"
    JOIN = "join"


class _Node(Definition):
    output: Name | None = Field(
        default=None, description="The state key the node's output is written to (default: the node's name)."
    )
    timeout_s: float = Field(default=10.0, gt=0, le=3600, description="Seconds the node may take.")
    max_visits: int | None = Field(
        default=None, ge=1, le=10_000, description="Runs of this node per run; required on a node of every cycle."
    )


class ToolNode(_Node):
    """Calls a tool; argument values starting with ``$`` are paths into the state (``$input.text``)."""

    kind: Literal[NodeKind.TOOL] = NodeKind.TOOL
    tool: Name = Field(description="The tool to call (the tenant must be allowed it).")
    args: dict[str, JsonValue] = Field(
        default_factory=dict, description="The call's arguments; a string `$path` reads the state (`$input.text`)."
    )


class ModelNode(_Node):
    """Asks a model: ``prompt`` (and ``system``) are templates with ``{path}`` placeholders.

    With ``output_schema`` the model must answer JSON matching it, and the parsed object is the
    node's output; otherwise the output is the answer's text.
    """

    kind: Literal[NodeKind.MODEL] = NodeKind.MODEL
    model: Name | None = Field(default=None, description="The model to ask (default: the graph's `model`).")
    system: str | None = Field(default=None, description="The system message: a template.")
    prompt: str = Field(description="The user message: a template with `{path}` placeholders (`{input.text}`).")
    output_schema: dict[str, Any] | None = Field(
        default=None, description="A JSON schema the answer must match; the parsed object is then the output."
    )

    @field_validator("output_schema")
    @classmethod
    def _schema_is_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return valid_schema(value, "output_schema")


class AgentNode(_Node):
    """A model that may call ``tools`` (through the bus, tenant injected) until it answers.

    The single-agent orchestrator as a node: each turn the model sees the tools' schemas and
    either asks for tool calls, whose results it gets back, or gives its answer (the output).
    """

    kind: Literal[NodeKind.AGENT] = NodeKind.AGENT
    model: Name | None = Field(default=None, description="The model (default: the graph's `model`).")
    system: str | None = Field(default=None, description="The system message: a template.")
    prompt: str = Field(description="The first user message: a template.")
    tools: list[Name] = Field(min_length=1, description="The tools the model may call.")
    max_turns: int = Field(default=5, ge=1, le=50, description="Model turns before the node fails.")
    timeout_s: float = Field(default=60.0, gt=0, le=3600)


class FunctionNode(_Node):
    """An operator-supplied Python function ``module:function``, called with the resolved args."""

    kind: Literal[NodeKind.FUNCTION] = NodeKind.FUNCTION
    callable: str = Field(pattern=CALLABLE_PATTERN, description="`module:function`, importable by the graph service.")
    args: dict[str, JsonValue] = Field(default_factory=dict, description="Keyword arguments; `$path` reads the state.")


class SubgraphNode(_Node):
    """Runs another graph with ``input`` (resolved from the state); its output is this node's."""

    kind: Literal[NodeKind.SUBGRAPH] = NodeKind.SUBGRAPH
    graph: Name = Field(description="The graph to run.")
    input: dict[str, JsonValue] = Field(default_factory=dict, description="Its input; `$path` reads the state.")


class RespondNode(_Node):
    """Text from a template with ``{path}`` placeholders over the run state."""

    kind: Literal[NodeKind.RESPOND] = NodeKind.RESPOND
    template: str = Field(description="The text, with `{path}` placeholders (`{lookup.order.id}`).")


class JoinWait(StrEnum):
    ALL = "all"  # every branch leading into the join
    ANY = "any"  # the first step in which at least one branch arrives; later arrivals are dropped


class JoinNode(_Node):
    """Waits for branches; its output maps each arrived branch to that branch's output."""

    kind: Literal[NodeKind.JOIN] = NodeKind.JOIN
    wait: JoinWait = Field(default=JoinWait.ALL, description="`all` branches, or the first step `any` arrives.")


Node = Annotated[
    ToolNode | ModelNode | AgentNode | FunctionNode | SubgraphNode | RespondNode | JoinNode,
    Field(discriminator="kind"),
]


class Reducer(StrEnum):
    """How writes to one state key are combined (applied in node declaration order)."""

    REPLACE = "replace"
    APPEND = "append"
    EXTEND = "extend"
    MERGE = "merge"
    SUM = "sum"
    MAX = "max"
    MIN = "min"


class Edge(Definition):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    source: Name = Field(alias="from", description="The node the edge leaves.")
    target: Name | list[Name] = Field(
        alias="to", description="The next node, `end`, or a list of nodes to run in parallel (fan-out)."
    )
    when: str | None = Field(
        default=None,
        description="A condition over the state (`lookup.found == true`); without one, the default edge.",
    )

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.target) if isinstance(self.target, list) else (self.target,)

    @field_validator("target")
    @classmethod
    def _some_target(cls, value: Name | list[Name]) -> Name | list[Name]:
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("a fan-out needs distinct targets")
        return value

    @field_validator("when")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                compile_expression(value)
            except ExpressionError as exc:
                raise ValueError(exc.message) from None  # pydantic reports ValueErrors with the field
        return value


class GraphDefinition(Definition):
    """Nodes joined by edges, run from ``entry``; the run state holds ``input`` and each node's output."""

    name: Name
    description: str = ""
    input_schema: dict[str, Any] | None = Field(
        default=None,
        description="A JSON schema of the input: the router refuses a request outside it, and templates may "
        "read only the fields it declares.",
    )
    entry: Name = Field(description="The node that runs first.")
    nodes: dict[Name, Node] = Field(description="The nodes by name; each has a `kind`.")
    edges: list[Edge] = Field(default_factory=list, description="From each node the first edge whose `when` holds.")
    reducers: dict[Name, Reducer] = Field(
        default_factory=dict, description="How writes to a state key are combined (default: replace)."
    )
    output: str | None = Field(
        default=None, description="A path into the final state (default: the output of the last node that ran)."
    )
    model: Name | None = Field(default=None, description="The model of model and agent nodes that name none.")
    max_steps: int = Field(default=100, ge=1, le=100_000, description="Node runs per run.")
    timeout_s: float = Field(default=30.0, gt=0, le=86_400, description="Seconds a run may take.")

    @field_validator("input_schema")
    @classmethod
    def _schema_is_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return valid_schema(value, "input_schema")

    @model_validator(mode="after")
    def _well_formed(self) -> GraphDefinition:
        problems = _problems(self)
        if problems:
            raise Problems(f"graph {self.name!r}", problems)
        return self

    def output_key(self, node: str) -> str:
        return self.nodes[node].output or node

    def incoming(self, node: str) -> list[str]:
        """Sources of the edges into ``node``, in declaration order, without repeats."""
        return list(dict.fromkeys(edge.source for edge in self.edges if node in edge.targets))

    def of_kind(self, kind: type[_Node]) -> list[Any]:
        return [node for node in self.nodes.values() if isinstance(node, kind)]

    def tools(self) -> set[str]:
        return {node.tool for node in self.of_kind(ToolNode)} | {
            t for node in self.of_kind(AgentNode) for t in node.tools
        }

    def subgraphs(self) -> set[str]:
        return {node.graph for node in self.of_kind(SubgraphNode)}

    def models(self) -> set[str]:
        nodes = [*self.of_kind(ModelNode), *self.of_kind(AgentNode)]
        return {name for node in nodes if (name := node.model or self.model) is not None}

    def uses(self) -> list[tuple[str, str, Location]]:
        """Every tool, graph and model the graph names: (what, name, where in the graph)."""
        found: list[tuple[str, str, Location]] = []
        for name, node in self.nodes.items():
            where = ("nodes", name)
            if isinstance(node, ToolNode):
                found.append(("tool", node.tool, (*where, "tool")))
            if isinstance(node, AgentNode):
                found += [("tool", tool, (*where, "tools", index)) for index, tool in enumerate(node.tools)]
            if isinstance(node, SubgraphNode):
                found.append(("graph", node.graph, (*where, "graph")))
            if isinstance(node, ModelNode | AgentNode):
                if node.model is not None:
                    found.append(("model", node.model, (*where, "model")))
                elif self.model is not None:
                    found.append(("model", self.model, ("model",)))
        return found


def valid_schema(value: dict[str, Any] | None, field: str) -> dict[str, Any] | None:
    """``value`` if it is a valid JSON schema (or None); a ValueError naming ``field`` else."""
    if value is not None:
        try:
            jsonschema.validators.validator_for(value).check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"{field} is not a valid JSON schema: {exc.message}") from None
    return value


def _problems(graph: GraphDefinition) -> list[Problem]:
    problems = []
    for name, node in graph.nodes.items():
        if name in RESERVED_KEYS or node.output in RESERVED_KEYS:
            problems.append(Problem(("nodes", name), f"node {name!r}: 'end' and 'input' are reserved"))
        if isinstance(node, ModelNode | AgentNode) and node.model is None and graph.model is None:
            message = f"model node {name!r} names no model and the graph has no default model"
            problems.append(Problem(("nodes", name), message))
    if graph.entry not in graph.nodes:
        message = f"entry {graph.entry!r} is not a node" + did_you_mean(graph.entry, graph.nodes)
        problems.append(Problem(("entry",), message))
    defaults: dict[str, list[int]] = {}
    for index, edge in enumerate(graph.edges):
        if edge.source not in graph.nodes:
            message = f"edge from unknown node {edge.source!r}" + did_you_mean(edge.source, graph.nodes)
            problems.append(Problem(("edges", index, "from"), message))
        problems += [
            Problem(("edges", index, "to"), f"edge to unknown node {t!r}" + did_you_mean(t, [*graph.nodes, END]))
            for t in edge.targets
            if t != END and t not in graph.nodes
        ]
        if edge.when is None:
            defaults.setdefault(edge.source, []).append(index)
    problems += [
        Problem(
            ("edges", edges[1]), f"node {name!r} has {len(edges)} default edges (fan out with one edge: to: [a, b])"
        )
        for name, edges in defaults.items()
        if len(edges) > 1
    ]
    for name, node in graph.nodes.items():
        if isinstance(node, JoinNode) and len(graph.incoming(name)) < 2:
            problems.append(Problem(("nodes", name), f"join {name!r} has fewer than two branches leading into it"))
    if problems:
        return problems
    unreachable = set(graph.nodes) - _reachable(graph)
    if unreachable:
        first = next(name for name in graph.nodes if name in unreachable)
        problems.append(Problem(("nodes", first), f"unreachable nodes {sorted(unreachable)}"))
    for cycle in _cycles(graph):
        if all(graph.nodes[name].max_visits is None for name in cycle):
            first = next(name for name in graph.nodes if name in cycle)
            problems.append(Problem(("nodes", first), f"cycle through {sorted(cycle)} has no node with max_visits"))
    return problems or _reference_problems(graph)


# ---- what templates, arguments and conditions read ---------------------------------------


def _written_before(graph: GraphDefinition) -> dict[str, frozenset[str]]:
    """For each node, the state keys that every path from the entry has written before it runs.

    A node runs when an edge from a node that ran leads to it, so it can rely on what every such
    predecessor could rely on, plus that predecessor's own output; a join that waits for ``all``
    runs only once every branch has arrived, so it can rely on what any of them could. Computed
    as the greatest fixpoint (from "every key" down), which handles cycles.
    """
    keys = {name: graph.output_key(name) for name in graph.nodes}
    before = {name: frozenset(keys.values()) for name in graph.nodes}
    before[graph.entry] = frozenset()
    incoming = {name: graph.incoming(name) for name in graph.nodes}
    changed = True
    while changed:
        changed = False
        for name, node in graph.nodes.items():
            if name == graph.entry:
                continue
            arriving = [before[source] | {keys[source]} for source in incoming[name]]
            waits_for_all = isinstance(node, JoinNode) and node.wait is JoinWait.ALL
            found = frozenset().union(*arriving) if waits_for_all else frozenset.intersection(*arriving)
            if found != before[name]:
                before[name] = found
                changed = True
    return before


def _node_references(node: Any, where: Location, names: set[str]) -> tuple[list[Reference], list[Problem]]:
    """What a node reads from the state, and the slips in how it is written."""
    if isinstance(node, ToolNode | FunctionNode | SubgraphNode):
        field = "input" if isinstance(node, SubgraphNode) else "args"
        value = getattr(node, field)
        return argument_references(value, (*where, field)), argument_slips(value, (*where, field), names)
    references: list[Reference] = []
    slips: list[Problem] = []
    for field in ("system", "prompt", "template"):
        text = getattr(node, field, None)
        references += template_references(text, (*where, field))
        slips += template_slips(text, (*where, field), names)
    return references, slips


def _reference_problems(graph: GraphDefinition) -> list[Problem]:
    writers: dict[str, list[str]] = {}
    for name in graph.nodes:
        writers.setdefault(graph.output_key(name), []).append(name)
    names = {"input", *writers}
    before = _written_before(graph)
    problems: list[Problem] = []

    def check(reference: Reference, available: frozenset[str], reader: str) -> None:
        name = reference.name
        if name == "input":
            found = input_field_problem(reference, graph.input_schema)
        elif name in available:
            found = _output_field_problem(graph, reference, writers[name])
        elif name in writers:
            found = Problem(
                reference.where,
                f"{reference.shown} reads {name!r}, which not every path to {reader} has written "
                f"(it is the output of {_nodes(writers[name])})",
            )
        elif name == "params":
            found = Problem(reference.where, f"{reference.shown}: a graph has no params (a route's reach workflows)")
        else:
            found = Problem(
                reference.where,
                f"{reference.shown} reads {name!r}, which is neither the input nor the output of a node"
                + did_you_mean(name, names),
            )
        if found is not None:
            problems.append(found)

    for name, node in graph.nodes.items():
        references, slips = _node_references(node, ("nodes", name), names)
        problems += slips
        for reference in references:
            check(reference, before[name], f"node {name!r}")
    for index, edge in enumerate(graph.edges):
        available = before[edge.source] | {graph.output_key(edge.source)}
        for reference in condition_references(edge.when, ("edges", index, "when")):
            check(reference, available, f"the edge from {edge.source!r}")
    if graph.output is not None:
        check(Reference(("output",), graph.output, graph.output), frozenset(writers), "the end")
    return problems


def _output_field_problem(graph: GraphDefinition, reference: Reference, writers: list[str]) -> Problem | None:
    """A path into a node's output whose shape is known (text, an agent's, a join's, a model's
    with an output schema) and has no such key."""
    field = reference.field
    if field is None or reference.name in graph.reducers:
        return None
    nodes = [graph.nodes[name] for name in writers]
    if all(isinstance(node, RespondNode) for node in nodes):
        return Problem(
            reference.where, f"{reference.shown}: the output of {_nodes(writers)} is text, with no {field!r}"
        )
    fields: set[str] | None = None
    if all(isinstance(node, AgentNode) for node in nodes):
        fields = {"answer", "tool_calls"}
    elif all(isinstance(node, JoinNode) for node in nodes):
        fields = {branch for name in writers for branch in graph.incoming(name)}
    elif all(isinstance(node, ModelNode) and node.output_schema for node in nodes):
        declared = [node.output_schema.get("properties") for node in nodes]
        if all(isinstance(properties, dict) for properties in declared):
            fields = {key for properties in declared for key in properties}
    if fields is None or field in fields:
        return None
    return Problem(
        reference.where,
        f"{reference.shown} reads {field!r}, which the output of {_nodes(writers)} does not have "
        f"(it has {', '.join(sorted(fields))})" + did_you_mean(field, fields),
    )


def _nodes(names: list[str]) -> str:
    return ("node " if len(names) == 1 else "nodes ") + ", ".join(repr(name) for name in names)


def _successors(graph: GraphDefinition) -> dict[str, set[str]]:
    following: dict[str, set[str]] = {name: set() for name in graph.nodes}
    for edge in graph.edges:
        following[edge.source].update(t for t in edge.targets if t != END)
    return following


def _reachable(graph: GraphDefinition) -> set[str]:
    following = _successors(graph)
    seen, frontier = {graph.entry}, [graph.entry]
    while frontier:
        for target in following[frontier.pop()] - seen:
            seen.add(target)
            frontier.append(target)
    return seen


def _cycles(graph: GraphDefinition) -> list[set[str]]:
    """Strongly connected components that contain a cycle (Tarjan's algorithm, iterative)."""
    following = {name: sorted(targets) for name, targets in _successors(graph).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in graph.nodes:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, position = work.pop()
            if position == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if position < len(following[node]):
                work.append((node, position + 1))
                child = following[node][position]
                if child not in index:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1 or node in following[node]:
                    found.append(component)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found
