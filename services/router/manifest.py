"""The router's declaration: tenants' requests in; runs out to the executors, progress events."""

from contracts import subjects
from contracts.envelope import Kind, RouterRequest, RunEvent
from services.router.executors import SERVED
from services.runtime.manifest import Consume, Manifest, Publishes

MANIFEST = Manifest(
    name="router",
    summary="Admission (rate limit, input size, deadline) and route selection from the tenant's routing rules",
    consumes=(
        Consume(
            "request",
            subjects.ROUTER_REQUESTS,
            Kind.REQUEST,
            RouterRequest,
            "A tenant's request: admitted, routed by the tenant's rules, answered by the executor with the result",
            tenant_facing=True,
        ),
    ),
    publishes=(
        *(
            Publishes(runs, f"A run passed on to the {service} executor, with the client's reply")
            for service, runs in SERVED.items()
        ),
        Publishes(
            subjects.ALL_EVENTS,
            "Progress of one run (accepted, started, node, completed, failed); a tenant may subscribe",
            RunEvent,
            address="t.{tenant}.events.{principal}.{run_id}",
        ),
    ),
    # Relayed (not passed on) while no executor answered the last probe: fails at once, typed.
    requests=tuple(SERVED.values()),
    watches=tuple(SERVED),
    # Each replica takes its share of a tenant's rate limit (services/router/policy.py).
    counts_replicas=True,
)
