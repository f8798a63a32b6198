"""Schemas of what operators declare as data: tools, graphs and per-tenant routing rules.

A definitions file (YAML or JSON) may hold any of the top-level lists ``tools``, ``graphs`` and
``tenants``; :class:`Catalog` merges them and checks every cross-reference once, at load time,
so a bad definition fails before the first request rather than in the middle of one.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from contracts.definitions_base import Definition as _Definition
from contracts.definitions_base import DefinitionError
from contracts.graphs import GraphDefinition
from contracts.models import ModelDefinition
from contracts.tenants import Name, TenantId
from contracts.workflows import WorkflowDefinition

__all__ = [
    "Catalog",
    "DefinitionError",
    "DefinitionsFile",
    "GraphDefinition",
    "ModelDefinition",
    "TenantPolicy",
    "WorkflowDefinition",
]


# ---- tools -------------------------------------------------------------------------------


class PythonTool(_Definition):
    """A Python callable ``module:function``, called as ``function(ctx, **arguments)``."""

    callable: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class HttpTool(_Definition):
    """An HTTP/REST endpoint; the tenant is injected by the runtime, never by the caller."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    # May contain {tenant_id} (filled by the runtime) and {argument} placeholders, and ${NAME}
    # environment variables (filled in when the tools service builds the tool; unset is an error).
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    tenant_header: str | None = "X-Corral-Tenant"
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    max_response_bytes: int = Field(default=1024 * 1024, gt=0)
    # Retried on connection errors and 502/503/504, for idempotent methods (POST and PATCH only
    # when the call carries an idempotency key: services/tools/http_adapter.py).
    retries: int = Field(default=2, ge=0, le=10)


class McpTool(_Definition):
    """A tool of an MCP server declared under ``mcp_servers``."""

    server: Name
    tool: str = Field(min_length=1, max_length=128)  # the tool's name on that server


class McpStdio(_Definition):
    command: str
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)


class McpHttp(_Definition):
    url: str  # the streamable HTTP endpoint, e.g. http://localhost:8000/mcp
    headers: dict[str, str] = Field(default_factory=dict)


class McpServer(_Definition):
    """An MCP server the tools service connects to (stdio subprocess or streamable HTTP)."""

    name: Name
    stdio: McpStdio | None = None
    http: McpHttp | None = None
    # The tool argument that carries the tenant, filled by the runtime (also sent in _meta).
    tenant_argument: str | None = "tenant_id"
    timeout_s: float = Field(default=30.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _one_transport(self) -> McpServer:
        if (self.stdio is None) == (self.http is None):
            raise ValueError(f"MCP server {self.name!r} needs exactly one of 'stdio' or 'http'")
        return self


class ToolDefinition(_Definition):
    name: Name
    description: str = ""
    # JSON schema of the arguments a caller (or a model) may pass; never contains the tenant.
    # For an MCP tool left at the default, the server's own schema is used once listed.
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    python: PythonTool | None = None
    http: HttpTool | None = None
    mcp: McpTool | None = None

    @model_validator(mode="after")
    def _exactly_one_adapter(self) -> ToolDefinition:
        if sum(adapter is not None for adapter in (self.python, self.http, self.mcp)) != 1:
            raise ValueError(f"tool {self.name!r} needs exactly one of 'python', 'http' or 'mcp'")
        return self


# ---- tenants and routing -----------------------------------------------------------------


class Pattern(StrEnum):
    GRAPH = "graph"
    WORKFLOW = "workflow"


class Route(_Definition):
    """What a target runs: a graph (``pattern: graph``, the default) or a workflow."""

    pattern: Pattern = Pattern.GRAPH
    graph: Name | None = None
    workflow: Name | None = None
    # Values the tenant's runs of this route read as ``params`` (a workflow's approval threshold).
    params: dict[str, JsonValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names_what_it_runs(self) -> Route:
        wanted = {Pattern.GRAPH: "graph", Pattern.WORKFLOW: "workflow"}[self.pattern]
        for key in ("graph", "workflow"):
            given = getattr(self, key) is not None
            if key == wanted and not given:
                raise ValueError(f"a route of pattern {self.pattern.value!r} needs '{key}'")
            if key != wanted and given:
                raise ValueError(f"a route of pattern {self.pattern.value!r} takes no '{key}'")
        return self

    @property
    def runs(self) -> str:
        """The name of the graph or workflow the route runs."""
        return self.graph or self.workflow or ""


class RateLimit(_Definition):
    per_second: float = Field(default=50.0, gt=0)
    burst: int = Field(default=100, ge=1)


class ConnectionLimits(_Definition):
    """Limits of the tenant's connections to the broker. The subscription and payload limits are
    written into each user JWT the auth service issues (nats-server 2.15 does not apply them to
    callout-issued users yet: docs/security.md); the connection count is the auth service's to
    enforce, and a connection past it is refused at connect."""

    max_subscriptions: int = Field(default=1000, ge=1, le=1_000_000)
    # The largest message a connection may publish (an envelope: the input plus its fields).
    max_payload_bytes: int = Field(default=256 * 1024, ge=1024, le=1024 * 1024)
    # Connections the tenant may hold open at once, all its users together. Enforced by the auth
    # service at connect, from the broker's connect and disconnect events (docs/security.md).
    max_connections: int = Field(default=64, ge=1, le=65_536)


class TenantPolicy(_Definition):
    """What one tenant may reach: its routes (targets), default route and tools."""

    tenant: TenantId
    default_route: Name | None = None
    routes: dict[Name, Route] = Field(default_factory=dict)
    tools: list[Name] = Field(default_factory=list)
    rate_limit: RateLimit = Field(default_factory=RateLimit)
    max_input_bytes: int = Field(default=64 * 1024, gt=0)
    connection: ConnectionLimits = Field(default_factory=ConnectionLimits)
    # Each user (principal) of the tenant sees only its own replies and run events; by default
    # the users of a tenant share its inbox namespace and events (isolation is between tenants).
    principal_scoped: bool = False

    @model_validator(mode="after")
    def _default_is_a_route(self) -> TenantPolicy:
        if self.default_route is not None and self.default_route not in self.routes:
            raise ValueError(f"tenant {self.tenant!r}: default route {self.default_route!r} is not a route")
        if self.connection.max_payload_bytes < self.max_input_bytes:
            raise ValueError(
                f"tenant {self.tenant!r}: connection.max_payload_bytes ({self.connection.max_payload_bytes}) is "
                f"below max_input_bytes ({self.max_input_bytes}): no input that large could be sent"
            )
        return self


# ---- the catalog -------------------------------------------------------------------------


class DefinitionsFile(_Definition):
    tools: list[ToolDefinition] = Field(default_factory=list)
    mcp_servers: list[McpServer] = Field(default_factory=list)
    graphs: list[GraphDefinition] = Field(default_factory=list)
    models: list[ModelDefinition] = Field(default_factory=list)
    workflows: list[WorkflowDefinition] = Field(default_factory=list)
    tenants: list[TenantPolicy] = Field(default_factory=list)


class Catalog(BaseModel):
    """Every definition, by name, with cross-references checked."""

    model_config = ConfigDict(frozen=True)

    tools: dict[str, ToolDefinition]
    mcp_servers: dict[str, McpServer]
    graphs: dict[str, GraphDefinition]
    models: dict[str, ModelDefinition]
    tenants: dict[str, TenantPolicy]
    workflows: dict[str, WorkflowDefinition] = Field(default_factory=dict)

    @classmethod
    def merge(cls, files: list[DefinitionsFile]) -> Catalog:
        tools = _unique("tool", [t for f in files for t in f.tools], lambda t: t.name)
        graphs = _unique("graph", [g for f in files for g in f.graphs], lambda g: g.name)
        models = _unique("model", [m for f in files for m in f.models], lambda m: m.name)
        servers = _unique("MCP server", [m for f in files for m in f.mcp_servers], lambda m: m.name)
        tenants = _unique("tenant", [p for f in files for p in f.tenants], lambda p: p.tenant)
        workflows = _unique("workflow", [w for f in files for w in f.workflows], lambda w: w.name)
        catalog = cls(
            tools=tools, mcp_servers=servers, graphs=graphs, models=models, tenants=tenants, workflows=workflows
        )
        catalog._check_references()
        return catalog

    def _check_references(self) -> None:
        for tool in self.tools.values():
            if tool.mcp is not None and tool.mcp.server not in self.mcp_servers:
                raise DefinitionError(f"tool {tool.name!r} uses unknown MCP server {tool.mcp.server!r}")
        for graph in self.graphs.values():
            for what, used, known in (
                ("tool", graph.tools(), self.tools),
                ("graph", graph.subgraphs(), self.graphs),
                ("model", graph.models(), self.models),
            ):
                for name in sorted(used - set(known)):
                    raise DefinitionError(f"graph {graph.name!r} uses unknown {what} {name!r}")
            self.tools_of(graph.name)  # refuses subgraph cycles
        for workflow in self.workflows.values():
            for what, used, known in (
                ("tool", workflow.tools(), self.tools),
                ("graph", workflow.graphs(), self.graphs),
                ("model", workflow.models(), self.models),
            ):
                for name in sorted(used - set(known)):
                    raise DefinitionError(f"workflow {workflow.name!r} uses unknown {what} {name!r}")
        for policy in self.tenants.values():
            for tool in policy.tools:
                if tool not in self.tools:
                    raise DefinitionError(f"tenant {policy.tenant!r} allows unknown tool {tool!r}")
            for name, route in policy.routes.items():
                known = self.workflows if route.pattern is Pattern.WORKFLOW else self.graphs
                if route.runs not in known:
                    raise DefinitionError(
                        f"tenant {policy.tenant!r}: route {name!r} uses unknown {route.pattern.value} {route.runs!r}"
                    )
                missing = self.tools_of_route(route) - set(policy.tools)
                if missing:
                    raise DefinitionError(
                        f"tenant {policy.tenant!r}: route {name!r} needs tools {sorted(missing)} "
                        "the tenant is not allowed"
                    )

    def policy(self, tenant: str) -> TenantPolicy | None:
        return self.tenants.get(tenant)

    def tools_of_route(self, route: Route) -> set[str]:
        """Every tool a route's runs can call (its graph's, or its workflow's and their graphs')."""
        if route.pattern is Pattern.WORKFLOW:
            workflow = self.workflows[route.runs]
            return set().union(workflow.tools(), *(self.tools_of(graph) for graph in workflow.graphs()))
        return self.tools_of(route.runs)

    def graphs_of(self, tenant: str) -> frozenset[str]:
        """The graphs a tenant's runs may run: its graph routes', and those its workflows run."""
        policy = self.tenants.get(tenant)
        if policy is None:
            return frozenset()
        found: set[str] = set()
        for route in policy.routes.values():
            if route.pattern is Pattern.WORKFLOW:
                found |= self.workflows[route.runs].graphs()
            else:
                found.add(route.runs)
        return frozenset(found)

    def workflows_of(self, tenant: str) -> dict[str, Route]:
        """The workflows a tenant's routes start, with the route (and its params) of each."""
        policy = self.tenants.get(tenant)
        if policy is None:
            return {}
        return {r.runs: r for r in policy.routes.values() if r.pattern is Pattern.WORKFLOW}

    def tools_of(self, graph: str, _within: tuple[str, ...] = ()) -> set[str]:
        """Every tool a graph can call, through its subgraphs too."""
        if graph in _within:
            raise DefinitionError(f"subgraphs form a cycle: {' -> '.join((*_within, graph))}")
        definition = self.graphs[graph]
        tools = set(definition.tools())
        for child in definition.subgraphs():
            tools |= self.tools_of(child, (*_within, graph))
        return tools


def _unique(what: str, items: list[Any], key: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for item in items:
        name = key(item)
        if name in result:
            raise DefinitionError(f"{what} {name!r} is defined twice")
        result[name] = item
    return result
