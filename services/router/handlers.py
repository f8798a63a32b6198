"""The router's bus layer: admit, select the route, pass the request on to the executor.

The executor answers the client directly (the request keeps the client's reply subject), so a
result never travels back through the router: one hop less per run, and no router state held
while a run is in flight.
"""

from __future__ import annotations

from typing import Any

from contracts import subjects
from contracts.definitions import Catalog
from contracts.envelope import EventType, RouterRequest, RunEvent, new_id
from contracts.errors import CorralError, NotFound
from services.router.executors import EXECUTORS
from services.router.policy import RateLimiter, Router
from services.runtime.service import Request, Service


def register(service: Service, catalog: Catalog) -> Router:
    """Bind the router's operation on ``service``; returns the policy object (for tests)."""
    router = Router(catalog, RateLimiter(shares=lambda: service.replicas.count))
    service.admission = router.admit
    service.follow_tenants(catalog).on_change(router.tenants_changed)
    # A request with a reply subject outside the tenant's inbox gets its error on its run's events.
    service.misdirected_to_events = True

    @service.handler("request")
    async def route_request(req: Request[RouterRequest]) -> Any:
        req.stream = req.payload.stream
        if req.envelope.run_id is None:
            req = req.with_run_id(new_id())
        try:
            rest = req.subject.rest  # ("request", <principal>[, <scopes>]): the broker checked both
            scopes = subjects.scopes_of(rest[2]) if len(rest) > 2 else frozenset()
            payload = req.payload
            decision = router.decide(req.tenant, payload.target, payload.input, req.size, req.principal, scopes)
            pattern = decision.route.pattern
            if req.stream:  # built only when the client watches: nobody else listens to events
                await req.emit(
                    RunEvent(
                        type=EventType.ACCEPTED,
                        service=service.name,
                        data={
                            "target": decision.target,
                            "pattern": pattern.value,
                            "chosen_by": decision.chosen_by,
                            "passed": list(decision.passed),
                        },
                    )
                )
            executor = EXECUTORS.get(pattern)
            if executor is None:
                raise NotFound(f"no executor serves pattern {pattern.value!r} in this deployment")
            run = executor.payload(decision.route, req.payload, req.stream)
            subject = executor.subject(req.tenant)
            liveness = service.watched[executor.service]
            if liveness.up:
                return await req.forward_json(subject, executor.kind, run)
            # No executor was running at the last probe: relay, so the broker's no-responders
            # (or the executor, if one has just started) answers now rather than at the deadline.
            try:
                output = await req.call_json(subject, executor.kind, run, passed_on=True)
            except CorralError as error:
                if error.remote:
                    liveness.saw(True)  # an executor answered (with the run's error)
                raise
            liveness.saw(True)
            return output
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
