"""The graph service's bus layer: decode (by the runtime), run the graph, emit events, reply."""

from __future__ import annotations

import time
from typing import Any

from contracts import subjects
from contracts.definitions import Catalog
from contracts.envelope import EventType, GraphRun, Kind, RunEvent, ToolCall
from contracts.errors import CorralError, Internal
from services.graph.errors import GraphNotFound
from services.graph.executor import CompiledGraph
from services.runtime.service import Request, Service


def register(service: Service, catalog: Catalog) -> None:
    """Declare the graph service's operations on ``service``."""
    graphs = {name: CompiledGraph(definition) for name, definition in catalog.graphs.items()}

    @service.operation(subjects.GRAPH_RUNS, Kind.GRAPH_RUN, GraphRun, "Run a declared graph for the tenant")
    async def run_graph(req: Request[GraphRun]) -> Any:
        graph = graphs.get(req.payload.graph)
        if graph is None:
            raise GraphNotFound(f"graph {req.payload.graph!r} is not defined")
        started = time.perf_counter()

        async def call_tool(tool: str, arguments: dict[str, Any], timeout: float) -> Any:
            call = ToolCall(tool=tool, arguments=arguments)
            return await req.call(subjects.tool_call(req.tenant, tool), Kind.TOOL_CALL, call, timeout=timeout)

        async def node_done(node: str, elapsed_ms: float) -> None:
            await req.emit(RunEvent(type=EventType.NODE, service=service.name, node=node, elapsed_ms=elapsed_ms))

        await req.emit(RunEvent(type=EventType.STARTED, service=service.name, data={"graph": graph.definition.name}))
        try:
            outcome = await graph.run(
                dict(req.payload.input),
                call_tool=call_tool,
                node_done=node_done,
                timeout=req.envelope.remaining(service.settings.default_timeout_s),
            )
        except Exception as error:
            # Watchers always see how a run ended; the runtime turns the error into the reply.
            known = error if isinstance(error, CorralError) else Internal("internal error")
            data = {"code": known.code.value, "message": known.message}
            await req.emit(_finished(service, EventType.FAILED, started, data))
            raise
        await req.emit(_finished(service, EventType.COMPLETED, started, {"path": list(outcome.path)}))
        return outcome.output


def _finished(service: Service, kind: EventType, started: float, data: dict[str, Any]) -> RunEvent:
    return RunEvent(type=kind, service=service.name, elapsed_ms=(time.perf_counter() - started) * 1000, data=data)
