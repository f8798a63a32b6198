"""Graph definitions: explicit nodes, conditional edges, fan-out, joins and reducers.

A graph runs in steps. Every node active in a step runs concurrently; their outputs are written to
the run state in declaration order (through a reducer where one is declared), so the result never
depends on which branch finished first. From each node the first edge whose condition holds is
taken (conditional edges before the default one); an edge may fan out to several nodes. A join
node waits for ``all`` or ``any`` of the branches that lead into it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, JsonValue, field_validator, model_validator

from contracts.definitions_base import Definition
from contracts.expressions import ExpressionError, compile_expression
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
    # Where the node's output goes in the run state (default: the node's name).
    output: Name | None = None
    timeout_s: float = Field(default=10.0, gt=0, le=3600)
    # Required on at least one node of every cycle.
    max_visits: int | None = Field(default=None, ge=1, le=10_000)


class ToolNode(_Node):
    """Calls a tool; argument values starting with ``$`` are paths into the state (``$input.text``)."""

    kind: Literal[NodeKind.TOOL] = NodeKind.TOOL
    tool: Name
    args: dict[str, JsonValue] = Field(default_factory=dict)


class ModelNode(_Node):
    """Asks a model: ``prompt`` (and ``system``) are templates with ``{path}`` placeholders.

    With ``output_schema`` the model must answer JSON matching it, and the parsed object is the
    node's output; otherwise the output is the answer's text.
    """

    kind: Literal[NodeKind.MODEL] = NodeKind.MODEL
    model: Name | None = None  # None: the graph's model
    system: str | None = None
    prompt: str
    output_schema: dict[str, Any] | None = None


class AgentNode(_Node):
    """A model that may call ``tools`` (through the bus, tenant injected) until it answers.

    The single-agent orchestrator as a node: each turn the model sees the tools' schemas and
    either asks for tool calls, whose results it gets back, or gives its answer (the output).
    """

    kind: Literal[NodeKind.AGENT] = NodeKind.AGENT
    model: Name | None = None
    system: str | None = None
    prompt: str
    tools: list[Name] = Field(min_length=1)
    max_turns: int = Field(default=5, ge=1, le=50)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)


class FunctionNode(_Node):
    """An operator-supplied Python function ``module:function``, called with the resolved args."""

    kind: Literal[NodeKind.FUNCTION] = NodeKind.FUNCTION
    callable: str = Field(pattern=CALLABLE_PATTERN)
    args: dict[str, JsonValue] = Field(default_factory=dict)


class SubgraphNode(_Node):
    """Runs another graph with ``input`` (resolved from the state); its output is this node's."""

    kind: Literal[NodeKind.SUBGRAPH] = NodeKind.SUBGRAPH
    graph: Name
    input: dict[str, JsonValue] = Field(default_factory=dict)


class RespondNode(_Node):
    """Text from a template with ``{path}`` placeholders over the run state."""

    kind: Literal[NodeKind.RESPOND] = NodeKind.RESPOND
    template: str


class JoinWait(StrEnum):
    ALL = "all"  # every branch leading into the join
    ANY = "any"  # the first step in which at least one branch arrives; later arrivals are dropped


class JoinNode(_Node):
    """Waits for branches; its output maps each arrived branch to that branch's output."""

    kind: Literal[NodeKind.JOIN] = NodeKind.JOIN
    wait: JoinWait = JoinWait.ALL


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

    source: Name = Field(alias="from")
    # One node, or several to fan out to in parallel.
    target: Name | list[Name] = Field(alias="to")
    when: str | None = None

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
    name: Name
    description: str = ""
    entry: Name
    nodes: dict[Name, Node]
    edges: list[Edge] = Field(default_factory=list)
    reducers: dict[Name, Reducer] = Field(default_factory=dict)
    # A path into the final state; default: the output of the last node that ran.
    output: str | None = None
    model: Name | None = None  # default model of the model nodes
    max_steps: int = Field(default=100, ge=1, le=100_000)
    timeout_s: float = Field(default=30.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _well_formed(self) -> GraphDefinition:
        problems = _problems(self)
        if problems:
            raise ValueError(f"graph {self.name!r}: " + "; ".join(problems))
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


def _problems(graph: GraphDefinition) -> list[str]:
    problems = []
    for name, node in graph.nodes.items():
        if name in RESERVED_KEYS or node.output in RESERVED_KEYS:
            problems.append(f"node {name!r}: 'end' and 'input' are reserved")
        if isinstance(node, ModelNode | AgentNode) and node.model is None and graph.model is None:
            problems.append(f"model node {name!r} names no model and the graph has no default model")
    if graph.entry not in graph.nodes:
        problems.append(f"entry {graph.entry!r} is not a node")
    defaults: dict[str, int] = {}
    for edge in graph.edges:
        if edge.source not in graph.nodes:
            problems.append(f"edge from unknown node {edge.source!r}")
        problems += [f"edge to unknown node {t!r}" for t in edge.targets if t != END and t not in graph.nodes]
        if edge.when is None:
            defaults[edge.source] = defaults.get(edge.source, 0) + 1
    problems += [
        f"node {name!r} has {count} default edges (fan out with one edge: to: [a, b])"
        for name, count in defaults.items()
        if count > 1
    ]
    for name, node in graph.nodes.items():
        if isinstance(node, JoinNode) and len(graph.incoming(name)) < 2:
            problems.append(f"join {name!r} has fewer than two branches leading into it")
    if problems:
        return problems
    unreachable = set(graph.nodes) - _reachable(graph)
    if unreachable:
        problems.append(f"unreachable nodes {sorted(unreachable)}")
    for cycle in _cycles(graph):
        if all(graph.nodes[name].max_visits is None for name in cycle):
            problems.append(f"cycle through {sorted(cycle)} has no node with max_visits")
    return problems


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
