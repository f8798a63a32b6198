"""Broker permissions: what a tenant user and each service role may publish and subscribe.

The auth service grants :func:`tenant_permissions` to every tenant connection; the generated
server configuration grants :data:`SERVICE_PERMISSIONS` to the service users. Both are built
from :mod:`contracts.subjects`, so the namespace and the permissions cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contracts import subjects
from contracts.audit import STREAM as AUDIT_STREAM


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    # Publishing to the reply subject of a received request (no blanket _INBOX permission).
    allow_responses: bool = False
    deny_publish: tuple[str, ...] = field(default=())
    deny_subscribe: tuple[str, ...] = field(default=())


def tenant_permissions(tenant: str) -> Permissions:
    """A tenant user: publish requests and signals, read its own events and inbox, nothing else."""
    return Permissions(
        publish=(subjects.router_request(tenant), subjects.workflow_signal(tenant)),
        subscribe=(subjects.tenant_events(tenant), subjects.tenant_inboxes(tenant)),
    )


# What a service needs of JetStream to keep the audit chain: create or look up the stream, read a
# tenant's last entry. Appends are plain publishes to its own audit subject.
AUDIT_STREAM_API = (
    f"$JS.API.STREAM.CREATE.{AUDIT_STREAM}",
    f"$JS.API.STREAM.INFO.{AUDIT_STREAM}",
    f"$JS.API.STREAM.MSG.GET.{AUDIT_STREAM}",
)


def _service(name: str, *, publish: tuple[str, ...] = (), subscribe: tuple[str, ...] = ()) -> Permissions:
    return Permissions(
        publish=(*publish, subjects.service_audit(name), *AUDIT_STREAM_API),
        subscribe=(*subscribe, f"{subjects.service_inbox_prefix(name)}.>", subjects.ping(name)),
        allow_responses=True,
    )


SERVICE_PERMISSIONS: dict[str, Permissions] = {
    "router": _service(
        "router",
        # The ping: whether an executor is running at all (services/runtime/liveness.py).
        publish=(subjects.GRAPH_RUNS, subjects.ALL_EVENTS, subjects.ping("graph")),
        subscribe=(subjects.ROUTER_REQUESTS,),
    ),
    "graph": _service(
        "graph",
        publish=(subjects.TOOL_CALLS, subjects.ALL_EVENTS),
        subscribe=(subjects.GRAPH_RUNS,),
    ),
    "tools": _service(
        "tools",
        publish=(subjects.ALL_EVENTS,),
        subscribe=(subjects.TOOL_CALLS,),
    ),
    # The auth service's second connection (it lives in the AUTH account): only its audit records,
    # for refusals of tokens a trusted key signed.
    "auth-audit": Permissions(
        publish=(subjects.service_audit("auth"), *AUDIT_STREAM_API),
        subscribe=(f"{subjects.service_inbox_prefix('auth-audit')}.>",),
    ),
    # The operator's console (readiness checks, bench's raw baseline, reading the audit trail).
    "admin": Permissions(
        publish=(
            subjects.ALL_PINGS,
            "bench.>",
            f"$JS.API.STREAM.INFO.{AUDIT_STREAM}",
            f"$JS.API.STREAM.MSG.GET.{AUDIT_STREAM}",
        ),
        subscribe=("_INBOX._admin.>", "bench.>"),
        allow_responses=True,
    ),
}
