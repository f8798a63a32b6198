"""Schemas of what operators declare as data: tools, graphs and per-tenant routing rules.

A definitions file (YAML or JSON) may hold any of the top-level lists of :class:`DefinitionsFile`
(``tools``, ``mcp_servers``, ``models``, ``graphs``, ``workflows``, ``tenants``, ``python_paths``);
:class:`Catalog` merges them and checks every cross-reference once, at load time, so a bad
definition fails before the first request rather than in the middle of one. Every problem is a
:class:`~contracts.definitions_base.Problem` at a path into its file, so the loader can name the line.
The reference of the format, ``docs/definitions.md``, and the JSON Schema for editors,
``contracts/definitions.schema.json``, are generated from these models.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from contracts.agents import AgentDefinition, Guardrail, SwarmDefinition
from contracts.definitions_base import Definition as _Definition
from contracts.definitions_base import DefinitionError, Location, Problem, Problems, did_you_mean
from contracts.errors import CorralError
from contracts.expressions import compile_expression
from contracts.graphs import GraphDefinition
from contracts.models import ModelDefinition
from contracts.tenants import TENANT_ID_PATTERN, Name, TenantId
from contracts.workflows import ToolStep, WorkflowDefinition

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

    callable: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="`module:function`, importable by the tools service (see `python_paths`).",
    )


class HttpTool(_Definition):
    """An HTTP/REST endpoint; the tenant is injected by the runtime, never by the caller."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = Field(
        default="GET", description="GET sends the arguments in the query; the others as a JSON body."
    )
    # May contain {tenant_id} (filled by the runtime) and {argument} placeholders, and ${NAME}
    # environment variables (filled in when the tools service builds the tool; unset is an error).
    url: str = Field(
        description="May hold `{tenant_id}` (the runtime's), `{argument}` placeholders and `${NAME}` environment "
        "variables (filled in when the tools service starts; unset, it does not start)."
    )
    headers: dict[str, str] = Field(default_factory=dict)
    tenant_header: str | None = Field(
        default="X-Corral-Tenant", description="The header that carries the tenant (null: none)."
    )
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    max_response_bytes: int = Field(default=1024 * 1024, gt=0, description="A larger response fails the call.")
    # Retried on connection errors and 502/503/504, for idempotent methods (POST and PATCH only
    # when the call carries an idempotency key: services/toolkit/http_adapter.py).
    retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description="Retries on connection errors and 502/503/504, for idempotent methods (POST and PATCH only "
        "with an idempotency key).",
    )


class McpTool(_Definition):
    """A tool of an MCP server declared under ``mcp_servers``."""

    server: Name = Field(description="The name of a server under `mcp_servers`.")
    tool: str = Field(min_length=1, max_length=128, description="The tool's name on that server.")


class McpStdio(_Definition):
    """An MCP server started as a subprocess, spoken to over its stdin and stdout."""

    command: str = Field(description="The program to run.")
    args: list[str] = Field(default_factory=list, description="Its arguments.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables it is given.")


class McpHttp(_Definition):
    """An MCP server reached over streamable HTTP."""

    url: str = Field(description="The streamable HTTP endpoint, e.g. `http://localhost:8000/mcp`.")
    headers: dict[str, str] = Field(default_factory=dict)


class McpServer(_Definition):
    """An MCP server the tools service connects to (stdio subprocess or streamable HTTP)."""

    name: Name
    stdio: McpStdio | None = Field(default=None, description="A subprocess (exactly one of `stdio` or `http`).")
    http: McpHttp | None = Field(default=None, description="A streamable HTTP endpoint.")
    # The tool argument that carries the tenant, filled by the runtime (also sent in _meta).
    tenant_argument: str | None = Field(
        default="tenant_id", description="The tool argument the runtime fills with the tenant (also sent in `_meta`)."
    )
    timeout_s: float = Field(default=30.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _one_transport(self) -> McpServer:
        if (self.stdio is None) == (self.http is None):
            raise ValueError(f"MCP server {self.name!r} needs exactly one of 'stdio' or 'http'")
        return self


class ToolDefinition(_Definition):
    """A tool: exactly one of ``python``, ``http`` or ``mcp``, and the JSON schema of its arguments."""

    name: Name
    description: str = Field(default="", description="Shown to a model that may call the tool.")
    # JSON schema of the arguments a caller (or a model) may pass; never contains the tenant.
    # For an MCP tool left at the default, the server's own schema is used once listed.
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object"},
        description="The JSON schema of the arguments (never the tenant, which the runtime injects); an MCP "
        "tool left at the default takes its server's.",
    )
    python: PythonTool | None = Field(default=None, description="A Python callable.")
    http: HttpTool | None = Field(default=None, description="An HTTP endpoint.")
    mcp: McpTool | None = Field(default=None, description="A tool of an MCP server.")

    @model_validator(mode="after")
    def _exactly_one_adapter(self) -> ToolDefinition:
        if sum(adapter is not None for adapter in (self.python, self.http, self.mcp)) != 1:
            raise ValueError(f"tool {self.name!r} needs exactly one of 'python', 'http' or 'mcp'")
        return self


# ---- tenants and routing -----------------------------------------------------------------


class Pattern(StrEnum):
    GRAPH = "graph"
    WORKFLOW = "workflow"
    SWARM = "swarm"
    ORCHESTRATOR = "orchestrator"


# The key of a route that names what its pattern runs.
RUNS_KEY = {Pattern.GRAPH: "graph", Pattern.WORKFLOW: "workflow", Pattern.SWARM: "swarm", Pattern.ORCHESTRATOR: "agent"}


class Route(_Definition):
    """What a target runs: a graph (``pattern: graph``, the default) or a workflow."""

    pattern: Pattern = Field(default=Pattern.GRAPH, description="What kind of run the route starts.")
    graph: Name | None = Field(default=None, description="The graph it runs (pattern `graph`).")
    workflow: Name | None = Field(default=None, description="The workflow it runs (pattern `workflow`).")
    swarm: Name | None = Field(default=None, description="The swarm a conversation talks to (pattern `swarm`).")
    agent: Name | None = Field(
        default=None, description="The one agent a conversation talks to (pattern `orchestrator`)."
    )
    when: str | None = Field(
        default=None,
        description="A condition (the safe expression language) over the request's `input` and the verified "
        "`principal` (`principal.id`, `principal.scopes`): with no target named, the routes that have one are tried "
        "in order and the first that holds serves the request (else `default_route`); a target named directly is "
        "served only if its condition holds.",
    )
    # Values the tenant's runs of this route read as ``params`` (a workflow's approval threshold).
    params: dict[str, JsonValue] = Field(
        default_factory=dict, description="Values the workflow's steps read as `params` (`params.threshold`)."
    )

    @model_validator(mode="after")
    def _when_parses(self) -> Route:
        if self.when is not None:
            try:
                compile_expression(self.when)
            except CorralError as error:  # an ExpressionError: reported at the route's key
                raise ValueError(f"when: {error.message}") from None
        return self

    @model_validator(mode="after")
    def _names_what_it_runs(self) -> Route:
        wanted = RUNS_KEY[self.pattern]
        for key in RUNS_KEY.values():
            given = getattr(self, key) is not None
            if key == wanted and not given:
                raise ValueError(f"a route of pattern {self.pattern.value!r} needs '{key}'")
            if key != wanted and given:
                raise ValueError(f"a route of pattern {self.pattern.value!r} takes no '{key}'")
        return self

    @property
    def runs(self) -> str:
        """The name of the graph, workflow, swarm or agent the route runs."""
        return self.graph or self.workflow or self.swarm or self.agent or ""


class RateLimit(_Definition):
    """A token bucket, shared by the router replicas."""

    per_second: float = Field(default=50.0, gt=0, description="Requests per second, on average.")
    burst: int = Field(default=100, ge=1, description="Requests admitted at once after a quiet spell.")


class ConnectionLimits(_Definition):
    """Limits of the tenant's connections to the broker, written into each user JWT the auth
    service issues. nats-server 2.15 does not apply a callout-issued user's limits
    (docs/security.md), so Corral enforces them: a connection past ``max_connections`` is refused
    at connect, one past ``max_subscriptions`` is closed by the auth service within seconds, and a
    message over ``max_payload_bytes`` is refused by the service it is sent to."""

    # Subscriptions one connection may hold; past it the auth service closes the connection.
    max_subscriptions: int = Field(default=1000, ge=1, le=1_000_000)
    # The largest message a connection may publish (an envelope: the input plus its fields);
    # larger ones are refused with invalid_request before they are decoded.
    max_payload_bytes: int = Field(default=256 * 1024, ge=1024, le=1024 * 1024)
    # Connections the tenant may hold open at once, all its users together. Enforced by the auth
    # service at connect, from the broker's connect and disconnect events (docs/security.md).
    max_connections: int = Field(default=64, ge=1, le=65_536)


class TenantPolicy(_Definition):
    """What one tenant may reach: its routes (targets), default route and tools."""

    tenant: TenantId = Field(
        description="The tenant id, as its tokens carry it.",
        json_schema_extra={"pattern": f"^{TENANT_ID_PATTERN.pattern}$"},
    )
    default_route: Name | None = Field(default=None, description="The route of a request that names no target.")
    routes: dict[Name, Route] = Field(
        default_factory=dict, description="Targets a request may name, each a graph or a workflow."
    )
    tools: list[Name] = Field(default_factory=list, description="The tools the tenant's runs may call.")
    rate_limit: RateLimit = Field(default_factory=RateLimit, description="Requests over it are `rate_limited`.")
    max_input_bytes: int = Field(
        default=64 * 1024, gt=0, description="The largest request input, in bytes of its JSON."
    )
    max_open_runs: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="Workflow runs the tenant may have open at once (running, waiting or sleeping); a start "
        "past it is refused with `limit_exceeded`, so one tenant cannot fill the broker's storage.",
    )
    connection: ConnectionLimits = Field(
        default_factory=ConnectionLimits, description="Limits of the tenant's connections to the broker."
    )
    # Each user (principal) of the tenant sees only its own replies and run events; by default
    # the users of a tenant share its inbox namespace and events (isolation is between tenants).
    principal_scoped: bool = Field(
        default=False, description="Each user sees only its own replies and run events (default: the tenant's)."
    )

    @model_validator(mode="after")
    def _default_is_a_route(self) -> TenantPolicy:
        problems = []
        if self.default_route is not None and self.default_route not in self.routes:
            message = f"default route {self.default_route!r} is not a route" + did_you_mean(
                self.default_route, self.routes
            )
            problems.append(Problem(("default_route",), message))
        if self.connection.max_payload_bytes < self.max_input_bytes:
            message = (
                f"connection.max_payload_bytes ({self.connection.max_payload_bytes}) is below max_input_bytes "
                f"({self.max_input_bytes}): no input that large could be sent"
            )
            problems.append(Problem(("connection", "max_payload_bytes"), message))
        if problems:
            raise Problems(f"tenant {self.tenant!r}", problems)
        return self


# ---- the catalog -------------------------------------------------------------------------


class DefinitionsFile(_Definition):
    """One definitions file: any of these lists (every file of a folder is merged into one catalog)."""

    tools: list[ToolDefinition] = Field(default_factory=list, description="Tools, by `name`.")
    mcp_servers: list[McpServer] = Field(default_factory=list, description="MCP servers that `mcp` tools use.")
    graphs: list[GraphDefinition] = Field(default_factory=list, description="Graphs, by `name`.")
    models: list[ModelDefinition] = Field(default_factory=list, description="Models that model nodes and steps ask.")
    workflows: list[WorkflowDefinition] = Field(default_factory=list, description="Workflows, by `name`.")
    agents: list[AgentDefinition] = Field(default_factory=list, description="Agents, by `name`.")
    swarms: list[SwarmDefinition] = Field(default_factory=list, description="Swarms of agents, by `name`.")
    guardrails: list[Guardrail] = Field(default_factory=list, description="Guardrails agents name, by `name`.")
    tenants: list[TenantPolicy] = Field(default_factory=list, description="Tenants, by `tenant`.")
    python_paths: list[str] = Field(
        default_factory=list,
        description="Folders, relative to this file, added to the services' import path (after the installed "
        "packages), so that `python` tools and `function` nodes there import without PYTHONPATH.",
    )


# The tools each route target needs (pattern, name) -> names, or None where a definition it
# reaches is broken: :meth:`Catalog.tenant_problems`'s memo for one set of definitions.
RouteNeeds = dict[tuple[Pattern, str], frozenset[str] | None]


class Catalog(BaseModel):
    """Every definition, by name, with cross-references checked."""

    model_config = ConfigDict(frozen=True)

    tools: dict[str, ToolDefinition]
    mcp_servers: dict[str, McpServer]
    graphs: dict[str, GraphDefinition]
    models: dict[str, ModelDefinition]
    tenants: dict[str, TenantPolicy]
    workflows: dict[str, WorkflowDefinition] = Field(default_factory=dict)
    agents: dict[str, AgentDefinition] = Field(default_factory=dict)
    swarms: dict[str, SwarmDefinition] = Field(default_factory=dict)
    guardrails: dict[str, Guardrail] = Field(default_factory=dict)

    @classmethod
    def merge(cls, files: list[DefinitionsFile]) -> Catalog:
        """One catalog of every file's definitions. Raises :class:`DefinitionError` with every
        problem (a name defined twice, a reference to something undefined), each at its place:
        ``Problem.file`` is the index in ``files``, ``where`` a path into that file's data."""
        problems: list[Problem] = []
        origins: dict[tuple[str, str], tuple[int, int]] = {}

        def collect(what: str, key: str, name_of: Any) -> dict[str, Any]:
            found: dict[str, Any] = {}
            for file, definitions in enumerate(files):
                for index, item in enumerate(getattr(definitions, key)):
                    name = name_of(item)
                    if name in found:
                        where = (key, index, "tenant" if key == "tenants" else "name")
                        problems.append(Problem(where, f"{what} {name!r} is defined twice", file))
                        continue
                    found[name] = item
                    origins[(key, name)] = (file, index)
            return found

        catalog = cls(
            tools=collect("tool", "tools", lambda t: t.name),
            mcp_servers=collect("MCP server", "mcp_servers", lambda m: m.name),
            graphs=collect("graph", "graphs", lambda g: g.name),
            models=collect("model", "models", lambda m: m.name),
            tenants=collect("tenant", "tenants", lambda p: p.tenant),
            workflows=collect("workflow", "workflows", lambda w: w.name),
            agents=collect("agent", "agents", lambda a: a.name),
            swarms=collect("swarm", "swarms", lambda s: s.name),
            guardrails=collect("guardrail", "guardrails", lambda g: g.name),
        )
        problems += catalog._reference_problems(origins)
        if problems:
            raise DefinitionError("; ".join(problem.message for problem in problems), problems)
        return catalog

    def _reference_problems(self, origins: dict[tuple[str, str], tuple[int, int]]) -> list[Problem]:
        problems: list[Problem] = []

        def add(key: str, name: str, where: Location, message: str, unknown: str | None = None) -> None:
            file, index = origins[(key, name)]
            problems.append(Problem((key, index, *where), message, file, unknown))

        known: dict[str, dict[str, Any]] = {
            "tool": self.tools,
            "graph": self.graphs,
            "model": self.models,
            "workflow": self.workflows,
            "agent": self.agents,
            "guardrail": self.guardrails,
        }
        for tool in self.tools.values():
            if tool.mcp is not None and tool.mcp.server not in self.mcp_servers:
                message = f"tool {tool.name!r} uses unknown MCP server {tool.mcp.server!r}"
                hint = did_you_mean(tool.mcp.server, self.mcp_servers)
                add("tools", tool.name, ("mcp", "server"), message + hint, tool.mcp.server)
        for key, owner, definitions in (
            ("graphs", "graph", self.graphs),
            ("workflows", "workflow", self.workflows),
            ("agents", "agent", self.agents),
            ("swarms", "swarm", self.swarms),
        ):
            for definition in definitions.values():
                for what, name, where in definition.uses():
                    if name not in known[what]:
                        message = f"{owner} {definition.name!r} uses unknown {what} {name!r}"
                        add(key, definition.name, where, message + did_you_mean(name, known[what]), name)
        for workflow in self.workflows.values():
            for where, step in workflow.located():
                tool = self.tools.get(step.tool) if isinstance(step, ToolStep) and step.local else None
                if tool is not None and tool.mcp is not None:
                    message = (
                        f"workflow {workflow.name!r}: step {step.name!r} calls MCP tool {tool.name!r} locally; "
                        "only Python and HTTP tools run in the workflow replica (remove `local`)"
                    )
                    add("workflows", workflow.name, (*where, "local"), message)
        for swarm in self.swarms.values():
            for index, agent in enumerate(swarm.members):
                for target in self.agents[agent].handoffs if agent in self.agents else ():
                    if target not in swarm.members:
                        message = f"swarm {swarm.name!r}: its member {agent!r} hands off to {target!r}, not a member"
                        add("swarms", swarm.name, ("members", index), message)
        for graph in self.graphs.values():
            try:
                self.tools_of(graph.name)
            except DefinitionError as cycle:
                add("graphs", graph.name, (), cycle.message)
        needs: RouteNeeds = {}  # the tenants' routes run the same few definitions
        for policy in self.tenants.values():
            for where, message, unknown in self.tenant_problems(policy, needs):
                add("tenants", policy.tenant, where, message, unknown)
        return problems

    def tenant_problems(
        self, policy: TenantPolicy, needs: RouteNeeds | None = None
    ) -> list[tuple[Location, str, str | None]]:
        """What is wrong with one tenant's policy against this catalog's definitions: each a path
        into the policy, the message, and the unknown name it refers to (if that is the problem).
        Used at load for every tenant, and for a tenant the registry changes while running.

        ``needs``: the tools each route target needs, remembered across calls by a caller that
        checks many tenants against the same definitions (10,000 tenants' routes walked the same
        workflows' steps 10,000 times: half of loading them)."""
        problems: list[tuple[Location, str, str | None]] = []
        for index, tool in enumerate(policy.tools):
            if tool not in self.tools:
                message = f"tenant {policy.tenant!r} allows unknown tool {tool!r}" + did_you_mean(tool, self.tools)
                problems.append((("tools", index), message, tool))
        for name, route in policy.routes.items():
            runnable = self._runnable(route.pattern)
            if route.runs not in runnable:
                message = f"tenant {policy.tenant!r}: route {name!r} uses unknown {route.pattern.value} {route.runs!r}"
                where: Location = ("routes", name, RUNS_KEY[route.pattern])
                problems.append((where, message + did_you_mean(route.runs, runnable), route.runs))
                continue
            key = (route.pattern, route.runs)
            if needs is not None and key in needs:
                needed = needs[key]
            else:
                needed = self._needed(route)
                if needs is not None:
                    needs[key] = needed
            if needed is None:  # a subgraph cycle or an unknown graph: reported on its own
                continue
            missing = needed - set(policy.tools)
            if missing:
                message = (
                    f"tenant {policy.tenant!r}: route {name!r} needs tools {sorted(missing)} the tenant is not allowed"
                )
                problems.append((("routes", name), message, None))
            if route.pattern is Pattern.ORCHESTRATOR and self.agents[route.runs].handoffs:
                message = (
                    f"tenant {policy.tenant!r}: route {name!r}: an orchestrator's agent hands off to nobody "
                    f"({route.runs!r} lists handoffs; make the route a swarm)"
                )
                problems.append((("routes", name, "agent"), message, None))
        started = {r.runs for r in policy.routes.values() if r.pattern is Pattern.WORKFLOW}
        for workflow in sorted(self._agent_reach(policy)[2] - started):
            message = (
                f"tenant {policy.tenant!r}: its agents start workflow {workflow!r}, which none of its "
                "routes names (a route gives the workflow its params)"
            )
            problems.append((("routes",), message, None))
        return problems

    def _needed(self, route: Route) -> frozenset[str] | None:
        """:meth:`tools_of_route`, or None where a definition it reaches is broken."""
        try:
            return frozenset(self.tools_of_route(route))
        except (DefinitionError, KeyError):
            return None

    def with_tenants(self, tenants: dict[str, TenantPolicy]) -> Catalog:
        """This catalog with another set of tenants (checked by the caller, with :meth:`tenant_problems`)."""
        return self.model_copy(update={"tenants": tenants})

    def policy(self, tenant: str) -> TenantPolicy | None:
        return self.tenants.get(tenant)

    def _runnable(self, pattern: Pattern) -> dict[str, Any]:
        return {
            Pattern.GRAPH: self.graphs,
            Pattern.WORKFLOW: self.workflows,
            Pattern.SWARM: self.swarms,
            Pattern.ORCHESTRATOR: self.agents,
        }[pattern]

    def agents_of_route(self, route: Route) -> set[str]:
        """The agents a conversation of a route may reach: a swarm's members or the orchestrator's
        agent, and every agent those call as tools (transitively)."""
        if route.pattern is Pattern.SWARM:
            pending = list(self.swarms[route.runs].members)
        elif route.pattern is Pattern.ORCHESTRATOR:
            pending = [route.runs]
        else:
            return set()
        found: set[str] = set()
        while pending:
            name = pending.pop()
            if name in found or name not in self.agents:
                continue
            found.add(name)
            pending += self.agents[name].agents
        return found

    def _agent_reach(self, policy: TenantPolicy) -> tuple[set[str], set[str], set[str]]:
        """The tools, graphs and workflows a tenant's agents may call, through all its routes."""
        tools: set[str] = set()
        graphs: set[str] = set()
        workflows: set[str] = set()
        for route in policy.routes.values():
            for name in self.agents_of_route(route):
                agent = self.agents[name]
                tools |= set(agent.tools)
                graphs |= {g for g in agent.graphs if g in self.graphs}
                workflows |= {w for w in agent.workflows if w in self.workflows}
        return tools, graphs, workflows

    def agents_of(self, tenant: str) -> frozenset[str]:
        """Every agent a tenant's conversations may reach (its routes' swarms and orchestrators)."""
        policy = self.tenants.get(tenant)
        if policy is None:
            return frozenset()
        return frozenset(name for route in policy.routes.values() for name in self.agents_of_route(route))

    def tools_of_route(self, route: Route) -> set[str]:
        """Every tool a route's runs can call (its graph's, or its workflow's and their graphs', or
        those of the agents of its conversations, their graphs' and workflows')."""
        if route.pattern in (Pattern.SWARM, Pattern.ORCHESTRATOR):
            tools: set[str] = set()
            for name in self.agents_of_route(route):
                agent = self.agents[name]
                tools |= set(agent.tools)
                tools |= set().union(*(self.tools_of(g) for g in agent.graphs if g in self.graphs))
                for workflow in agent.workflows:
                    if workflow in self.workflows:
                        tools |= self.tools_of_route(Route(pattern=Pattern.WORKFLOW, workflow=workflow))
            return tools
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
            elif route.pattern is Pattern.GRAPH:
                found.add(route.runs)
        _, graphs, workflows = self._agent_reach(policy)  # graphs agents run as tools, and workflows'
        found |= graphs
        for workflow in workflows:
            found |= self.workflows[workflow].graphs()
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
            if child in self.graphs:  # an unknown subgraph is a problem of its own
                tools |= self.tools_of(child, (*_within, graph))
        return tools
