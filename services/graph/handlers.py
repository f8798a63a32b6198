"""The graph service's bus layer: run the requested graph, emit events, reply with the output."""

from __future__ import annotations

import time
from typing import Any

from pydantic_core import to_json

from contracts import subjects
from contracts.definitions import Catalog
from contracts.envelope import EventType, GraphRun, Kind, RunEvent
from contracts.errors import CorralError, Internal
from services.graph.errors import GraphNotFound
from services.graph.executor import compile_library
from services.llm import MODEL_TOKENS, MODEL_TOKENS_HELP, Completion, ModelRegistry
from services.runtime.logging import run_targets
from services.runtime.service import Request, Service

NODE_EVENTS = {
    "node_started": EventType.NODE_STARTED,
    "node_completed": EventType.NODE_COMPLETED,
    "node_failed": EventType.NODE_FAILED,
}


def register(service: Service, catalog: Catalog, models: ModelRegistry | None = None) -> None:
    """Bind the graph service's operation on ``service``."""
    graphs = compile_library(catalog.graphs, catalog.tools)
    # The graphs each tenant's routes run (directly, or as a step of a workflow): the executor
    # checks a run against them itself, so a compromised or confused router (or workflow engine)
    # cannot run a graph for a tenant whose routes do not name it.
    allowed = {tenant: catalog.graphs_of(tenant) for tenant in catalog.tenants}
    registry = models or ModelRegistry(catalog.models)
    registry.meter.counts = service.stats.counter(MODEL_TOKENS, MODEL_TOKENS_HELP, key="model").add
    service.on_stop(registry.aclose)
    # The routes that run each graph, per tenant, to name the target in a run's log line (none:
    # the graph runs as a step of the tenant's workflows).
    targets = run_targets(catalog, "graph")

    def tenants_changed(current: Catalog, changed: frozenset[str]) -> None:
        for tenant in changed:  # a run already started goes on with the graph it was given
            allowed[tenant] = current.graphs_of(tenant)
        targets.update(run_targets(current, "graph", changed))

    service.follow_tenants(catalog).on_change(tenants_changed)
    runs = service.runs

    def log_run(req: Request[GraphRun], outcome: str, started: float) -> None:
        if runs.wanted(outcome == "ok"):  # nothing is built for a run that is not logged
            graph = req.payload.graph
            elapsed_ms = (time.perf_counter() - started) * 1000
            target = targets.get(req.tenant, {}).get(graph)
            runs.finished(req.tenant, req.envelope.run_id, "graph", target, outcome, elapsed_ms, graph)

    @service.handler("run")
    async def run_graph(req: Request[GraphRun]) -> Any:
        payload = req.payload
        req.stream = stream = payload.stream
        graph = graphs.get(payload.graph) if payload.graph in allowed.get(req.tenant, ()) else None
        if graph is None:  # the same answer for a graph that does not exist and one not the tenant's
            raise GraphNotFound(f"graph {payload.graph!r} is not defined for tenant {req.tenant!r}")
        started = time.perf_counter()
        bus = _RunOnBus(req, service.name, registry)
        # Events are built only when the client watches the run: nobody else listens to them.
        if stream:
            await req.emit(
                RunEvent(type=EventType.STARTED, service=service.name, data={"graph": graph.definition.name})
            )
        try:
            outcome = await graph.run(
                dict(payload.input), bus, timeout=req.remaining(service.settings.default_timeout_s)
            )
        except Exception as error:
            known = error if isinstance(error, CorralError) else Internal("internal error")
            if stream:  # watchers always see how a run ended; the runtime turns the error into the reply
                data = {"code": known.code.value, "message": known.message}
                await req.emit(_finished(service, EventType.FAILED, started, data))
            log_run(req, known.code.value, started)
            raise
        log_run(req, "ok", started)
        if bus.tokens:
            req.log.info("model_usage", tokens=bus.tokens, graph=graph.definition.name)
        if stream:
            data: dict[str, Any] = {"path": list(outcome.path)}
            if bus.tokens:
                data["tokens"] = bus.tokens
            await req.emit(_finished(service, EventType.COMPLETED, started, data))
        return outcome.output


class _RunOnBus:
    """The executor's runtime for one run: tool calls over the bus, model calls, progress events."""

    __slots__ = ("node_event", "registry", "req", "service", "tokens")

    def __init__(self, req: Request[GraphRun], service: str, registry: ModelRegistry) -> None:
        self.req = req
        self.service = service
        self.registry = registry
        self.tokens: dict[str, int] = {}  # model -> tokens used in this run
        self.node_event = self._node_event if req.stream else None

    async def call_tool(self, tool: str, arguments: dict[str, Any], timeout: float) -> Any:
        # The tool name comes from the validated definition and the arguments from the run's JSON
        # state: the payload is written directly, not validated again on every call.
        req = self.req
        call = to_json({"tool": tool, "arguments": arguments})
        return await req.call_json(subjects.tool_call(req.tenant, tool), Kind.TOOL_CALL, call, timeout=timeout)

    async def call_model(
        self,
        model: str,
        messages: list[dict[str, Any]],
        schema: dict[str, Any] | None,
        timeout: float,
        tool_schemas: list[dict[str, Any]] | None,
    ) -> Completion:
        registry = self.registry
        completion = await registry.get(model).complete(
            messages, json_schema=schema, tools=tool_schemas, timeout=min(timeout, self.req.remaining(timeout))
        )
        registry.meter.record(self.req.tenant, model, completion.usage)
        self.tokens[model] = self.tokens.get(model, 0) + completion.usage.total_tokens
        return completion

    async def _node_event(self, kind: str, node: str, elapsed_ms: float | None, data: dict[str, Any]) -> None:
        await self.req.emit(
            RunEvent(type=NODE_EVENTS[kind], service=self.service, node=node, elapsed_ms=elapsed_ms, data=data)
        )


def _finished(service: Service, kind: EventType, started: float, data: dict[str, Any]) -> RunEvent:
    return RunEvent(type=kind, service=service.name, elapsed_ms=(time.perf_counter() - started) * 1000, data=data)
