"""Broker permissions: what a tenant user and each service role may publish and subscribe.

The auth service grants :func:`tenant_permissions` to every tenant connection; the service users'
permissions are derived from their manifests (``services/runtime/manifest.py``). Both are built
from :mod:`contracts.subjects`, so the namespace and the permissions cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contracts import subjects


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    # Publishing to the reply subject of a received request (no blanket _INBOX permission).
    allow_responses: bool = False
    deny_publish: tuple[str, ...] = field(default=())
    deny_subscribe: tuple[str, ...] = field(default=())


# Scopes of one token granted as signal subjects; more are dropped (a token is not a database).
MAX_SIGNAL_SCOPES = 32


def tenant_permissions(
    tenant: str, principal: str, *, principal_scoped: bool = False, scopes: frozenset[str] = frozenset()
) -> Permissions:
    """A tenant user: publish requests, queries (its workflow runs, its monitor figures) and signals
    as its own principal (signals also as the holder of each scope its verified token carries),
    read its tenant's events and inbox (``principal_scoped``: only its own principal's), nothing else."""
    if principal_scoped:
        subscribe = (subjects.principal_events(tenant, principal), subjects.tenant_inboxes(tenant, principal))
    else:
        subscribe = (subjects.tenant_events(tenant), subjects.tenant_inboxes(tenant))
    held = sorted(scope for scope in scopes if 0 < len(scope.encode()) <= subjects.MAX_PRINCIPAL_BYTES)
    return Permissions(
        publish=(
            subjects.router_request(tenant, principal),
            *((subjects.router_request(tenant, principal, scopes),) if subjects.scopes_token(scopes) else ()),
            subjects.workflow_signal(tenant, principal),
            *(subjects.workflow_signal(tenant, principal, scope) for scope in held[:MAX_SIGNAL_SCOPES]),
            subjects.workflow_query(tenant, principal),
            subjects.monitor_query(tenant, principal),
            *((subjects.monitor_query(tenant, principal, scopes),) if subjects.scopes_token(scopes) else ()),
        ),
        subscribe=subscribe,
    )
