"""The router's bus layer: admit, select the route, pass the request on to the executor.

The executor answers the client directly (the request keeps the client's reply subject), so a
result never travels back through the router: one hop less per run, and no router state held
while a run is in flight.
"""

from __future__ import annotations

from typing import Any

from pydantic_core import to_json

from contracts import subjects
from contracts.definitions import Catalog, Pattern
from contracts.envelope import EventType, Kind, RouterRequest, RunEvent, new_id
from contracts.errors import CorralError, Internal
from services.router.policy import Router
from services.runtime.service import Request, Service


def register(service: Service, catalog: Catalog) -> Router:
    """Declare the router's operation on ``service``; returns the policy object (for tests)."""
    router = Router(catalog)
    executor = service.watch("graph")

    @service.operation(
        subjects.ROUTER_REQUESTS,
        Kind.REQUEST,
        RouterRequest,
        "A tenant's request: admitted, routed by the tenant's rules, answered by the executor with the result",
        tenant_facing=True,
    )
    async def route_request(req: Request[RouterRequest]) -> Any:
        req.stream = req.payload.stream
        if req.envelope.run_id is None:
            req = req.with_run_id(new_id())
        try:
            decision = router.decide(req.tenant, req.payload.target, req.size)
            if req.stream:  # built only when the client watches: nobody else listens to events
                await req.emit(
                    RunEvent(
                        type=EventType.ACCEPTED,
                        service=service.name,
                        data={"target": decision.target, "pattern": decision.route.pattern.value},
                    )
                )
            if decision.route.pattern is Pattern.GRAPH:
                # The input was validated with the request and the graph name with the definitions:
                # the payload is written directly.
                run = to_json({"graph": decision.route.graph, "input": req.payload.input, "stream": req.stream})
                subject = subjects.graph_run(req.tenant)
                if executor.up:
                    return await req.forward_json(subject, Kind.GRAPH_RUN, run)
                # No executor was running at the last probe: relay, so the broker's no-responders
                # (or the executor, if one has just started) answers now rather than at the deadline.
                try:
                    output = await req.call_json(subject, Kind.GRAPH_RUN, run)
                except CorralError as error:
                    if error.remote:
                        executor.saw(True)  # an executor answered (with the run's error)
                    raise
                executor.saw(True)
                return output
            raise Internal(f"pattern {decision.route.pattern.value!r} is not served yet")
        except CorralError as error:
            if error.remote:
                raise  # the executor has already reported its own failure on the run's events
            await req.emit(
                RunEvent(
                    type=EventType.FAILED,
                    service=service.name,
                    data={"code": error.code.value, "message": error.message},
                )
            )
            raise

    return router
